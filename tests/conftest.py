import os
import random
from pathlib import Path

# The Triton kernels are tested on the CPU by Triton's interpreter. It must be on before Triton is first imported
# (Triton and @triton.jit choose the interpreter at that moment), hence here, ahead of every test module.
os.environ.setdefault("TRITON_INTERPRET", "1")
# One thread per process: the shapes are tiny, and the tests that launch `train.py` (2-process DDP, sweeps) would
# otherwise oversubscribe the 2-core CI machine many times over (measured: 15x more wall time under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (training to targets)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        # longest first: with several test processes (pytest -n), the short tests then fill in around the long ones
        items.sort(key=lambda item: "slow" not in item.keywords)
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(overrides) -> the run config as `python train.py <overrides>` would see it, output in tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def make(overrides=(), out=None):
        out = out or tmp_path
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose("config", overrides=[*overrides, f"hydra.run.dir={out}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            del cfg["hydra"]
        return cfg

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture
def poison(monkeypatch):
    """Every buffer a kernel allocates starts as garbage (floats NaN, integers -7): an unwritten element shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.fixture(scope="module")
def raw_text_dir(tmp_path_factory):
    """Raw {train,valid,test}.txt of random lines over 12 words: a word-level LM corpus (vocabulary 4 specials + 12)."""
    root = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    words = "in the beginning god created heaven and earth light was good".split()
    for split, n in (("train", 120), ("valid", 20), ("test", 20)):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root
