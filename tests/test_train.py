"""End to end: configs compose and build, every variant trains on copy, resume is exact, outputs land."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab.attention import ConfigError
from attnlab.train import build, run

ROOT = Path(__file__).resolve().parents[1]
ATTENTIONS = sorted(p.stem for p in (ROOT / "conf/attention").glob("*.yaml"))
TINY = ["model.net.d_model=16", "model.net.n_heads=2", "model.net.d_ff=32", "model.net.n_layers=1",
        "task.max_len=6", "task.batch_size=4", "task.val_size=8", "task.test_size=8"]


def causal_only_error(cfg) -> bool:
    """Variants that cannot run causally must be rejected for decoder-only models."""
    from attnlab.attention import get, role_options
    name, _ = role_options(cfg.attention, "decoder")
    return "decoder" not in get(name).roles


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_fast_dev_run_on_copy(compose_cfg, attention):
    cfg = compose_cfg([f"attention={attention}", "task=copy", "logger=none", "trainer.fast_dev_run=true",
                       "trainer.accelerator=cpu", *TINY])
    if causal_only_error(cfg):
        pytest.skip(f"{attention} is bidirectional-only: copy is a causal task (checked by the build test)")
    results = run(cfg)
    assert results["steps"] == 1 and all(map(lambda v: v == v, results["metrics"].values()))


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_resume_reproduces_uninterrupted_run(compose_cfg, tmp_path):
    common = ["logger=none", "trainer.accelerator=cpu", "trainer.val_check_interval=5", "test=false",
              "model.net.dropout=0.2", "trainer.enable_progress_bar=false", *TINY]
    run(compose_cfg([*common, "trainer.max_steps=10"], out=tmp_path / "full"))
    run(compose_cfg([*common, "trainer.max_steps=5"], out=tmp_path / "first"))
    run(compose_cfg([*common, "trainer.max_steps=10", f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}"],
                    out=tmp_path / "resumed"))
    full, resumed = _weights(tmp_path / "full/checkpoints/last.ckpt"), _weights(tmp_path / "resumed/checkpoints/last.ckpt")
    first = _weights(tmp_path / "first/checkpoints/last.ckpt")
    assert full.keys() == resumed.keys()
    assert any(not torch.equal(first[k], full[k]) for k in full)  # training moved the weights after step 5
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_results_json_and_offline_wandb(compose_cfg, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    cfg = compose_cfg(["logger=wandb", "trainer.accelerator=cpu", "trainer.max_steps=4",
                       "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", *TINY], out=tmp_path / "run")
    run(cfg)
    import wandb
    # run() returns after wandb.finish() and wandb.teardown(): the run is closed and the service that writes the
    # offline files has exited, so they are complete now (reading earlier was flaky on a loaded machine, issue #7)
    assert wandb.run is None
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert {"metrics", "config", "wall_time_s", "steps", "peak_memory"} <= results.keys()
    assert results["steps"] == 4 and "val/acc" in results["metrics"] and "test/acc" in results["metrics"]
    assert results["config"]["attention"]["name"] == "linear"
    runs = list((tmp_path / "run/wandb").glob("offline-run-*"))
    assert len(runs) == 1, "expected one offline wandb run under the output dir"
    logged = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    assert b"train/loss" in logged and b"val/acc" in logged
    assert (tmp_path / "run/learning_curves.png").stat().st_size > 1000


def _train_py(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_unknown_option_lists_the_valid_choices():
    res = _train_py("attention=nope", "--cfg", "job")
    assert res.returncode != 0
    assert "Could not find 'attention/nope'" in res.stderr and "linear" in res.stderr and "softmax" in res.stderr
    res = _train_py("attention.no_such_key=1", "--cfg", "job")
    assert res.returncode != 0 and "no_such_key" in res.stderr


def test_invalid_combination_fails_before_training(compose_cfg):
    cfg = compose_cfg(["attention=linear", "+attention.decoder.name=linformer", "logger=none"])
    with pytest.raises(ConfigError, match=r"(?s)linformer.*decoder.*Fix"):
        build(cfg)


def test_cfg_job_prints_the_composed_config():
    res = _train_py("attention=softmax", "--cfg", "job")
    assert res.returncode == 0, res.stderr
    assert "name: softmax" in res.stdout and "_target_: attnlab.tasks.copy.CopyDataModule" in res.stdout


def test_multirun_writes_one_results_file_per_job(tmp_path):
    res = _train_py("-m", "attention=softmax,linear", "logger=csv", "trainer.max_steps=2",
                    "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", *TINY,
                    f"hydra.sweep.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    found = sorted(tmp_path.glob("*/results.json"))
    assert len(found) == 2
    assert {json.loads(p.read_text())["config"]["attention"]["name"] for p in found} == {"softmax", "linear"}


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_bf16_mixed_precision_runs(compose_cfg, attention):
    cfg = compose_cfg([f"attention={attention}", "logger=none", "trainer.fast_dev_run=true", "trainer.accelerator=cpu",
                       "trainer.precision=bf16-mixed", *TINY])
    results = run(cfg)
    assert results["steps"] == 1 and all(v == v for v in results["metrics"].values())


def test_nan_loss_stops_with_a_clear_error(compose_cfg):
    datamodule, model, trainer = build(compose_cfg(["logger=none", "trainer.fast_dev_run=true",
                                                    "trainer.accelerator=cpu", *TINY]))
    with torch.no_grad():
        model.net.embed.tok.weight[2:, 0] = float("nan")  # every symbol (ids >= 2) now poisons the loss
    with pytest.raises(FloatingPointError, match=r"Fix: lower the learning rate \(`model.optimizer.lr`"):
        trainer.fit(model, datamodule=datamodule)
