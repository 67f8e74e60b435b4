"""Every task x attention pair and every experiment composes, picks a model that fits its task, and builds its network
(on the meta device: the paper-scale ones have hundreds of millions of parameters). Training runs of each task are in
the task's own test file (fast_dev_run on fixtures it writes)."""
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from attnlab.attention import ConfigError, get, role_options
from attnlab.train import build, check_model_fits_task

ROOT = Path(__file__).resolve().parents[1]
TASKS = sorted(p.stem for p in (ROOT / "conf/task").glob("*.yaml"))
ATTENTIONS = sorted(p.stem for p in (ROOT / "conf/attention").glob("*.yaml"))
EXPERIMENTS = sorted(str(p.relative_to(ROOT / "conf/experiment").with_suffix(""))
                     for p in (ROOT / "conf/experiment").rglob("*.yaml"))
# Stand-ins for what a datamodule's net_args() reports (vocabulary, lengths, feature size), where the task's data
# would fill them; values a config sets itself are kept.
DATA = {"vocab_size": 37, "src_vocab_size": 37, "max_len": 64, "max_source_len": 64, "max_target_len": 64,
        "input_dim": 40, "pad_id": 1}


def build_net(cfg):
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    if (net.get("adaptive") or {}).get("cutoffs") and net.get("vocab_size") is None:  # a vocabulary past the cutoffs
        net["vocab_size"] = max(net["adaptive"]["cutoffs"]) + DATA["vocab_size"]
    for key, value in DATA.items():
        if key in net and net[key] is None:
            net[key] = value
    try:
        with torch.device("meta"):
            return instantiate(net)
    except InstantiationException as e:  # Hydra wraps the constructor's error; attnlab.train unwraps it the same way
        raise e.__cause__ from None


def roles_needed(cfg) -> list[str]:
    kind = get_class(cfg.model._target_).batch_kind
    return {"lm": ["decoder"], "seq2seq": ["encoder", "decoder", "cross"], "ctc": ["encoder"]}[kind]


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("task", TASKS)
def test_task_attention_pair_composes_and_builds(compose_cfg, task, attention):
    cfg = compose_cfg([f"task={task}", f"attention={attention}", "logger=none"])
    check_model_fits_task(cfg)
    assert cfg.monitor.mode in ("min", "max") and cfg.optimized_metric.startswith("val/")
    if "attention" not in cfg.model.net:  # a model without attention (the BLSTM baseline)
        build_net(cfg)
        return
    unfit = [r for r in roles_needed(cfg) if r not in get(role_options(cfg.attention, r)[0]).roles]
    if unfit:  # e.g. Linformer (bidirectional only) as a causal decoder: refused with the fix named
        with pytest.raises(ConfigError, match="Fix"):
            build_net(cfg)
        return
    net = build_net(cfg)
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(compose_cfg, experiment):
    cfg = compose_cfg([f"experiment={experiment}", "logger=none"])
    check_model_fits_task(cfg)
    net = build_net(cfg)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_a_model_that_does_not_fit_the_task_is_refused_before_anything_is_built(compose_cfg):
    cfg = compose_cfg(["task=copy", "model=seq2seq", "logger=none"])
    with pytest.raises(ConfigError, match=r"(?s)'lm' batches.*'seq2seq'.*Fix: drop the `model=` override"):
        build(cfg)
