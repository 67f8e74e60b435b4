"""Lightning DDP on the CPU (gloo, 2 processes, launched by `python train.py trainer=ddp` as a user would).

Two processes with batch B each train exactly like one process with batch 2B: same samples per step (the sampler
splits each global batch across ranks), the loss normalised by the global token count, metrics reduced over ranks.
No dropout, so the only differences are float summation orders."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.net.d_model=16", "model.net.n_heads=2", "model.net.d_ff=32", "model.net.n_layers=1",
        "task.max_len=6", "task.val_size=24", "task.test_size=8", "logger=csv", "trainer.enable_progress_bar=false",
        "trainer.val_check_interval=3", "trainer.accelerator=cpu", "attention=linear"]


def train(out: Path, *overrides, processes: int = 1):
    ddp = ["trainer=ddp", f"trainer.devices={processes}"] if processes > 1 else []
    env = {**os.environ, "WANDB_MODE": "disabled"}
    res = subprocess.run([sys.executable, "train.py", *TINY, *ddp, *overrides, f"hydra.run.dir={out}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def val_curve(out: Path) -> dict[int, float]:
    with open(out / "csv/metrics.csv") as f:
        return {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    one = train(tmp_path / "one", "task.batch_size=8", "trainer.max_steps=9")
    two = train(tmp_path / "two", "task.batch_size=4", "trainer.max_steps=9", processes=2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    c1, c2 = val_curve(tmp_path / "one"), val_curve(tmp_path / "two")
    assert sorted(c1) == sorted(c2) and len(c1) == 3
    first = c1[min(c1)]
    assert c1[max(c1)] < first - 1e-3  # it trained: a curve, not a constant
    for step in c1:
        assert c2[step] == pytest.approx(c1[step], rel=1e-5, abs=1e-6), step
    assert two["metrics"]["test/loss"] == pytest.approx(one["metrics"]["test/loss"], rel=1e-5)
    assert not list((tmp_path / "two").glob("results*.json"))[1:]  # written once, by rank 0


@pytest.mark.slow
def test_two_process_resume_continues_the_uninterrupted_run(tmp_path):
    full = train(tmp_path / "full", "task.batch_size=4", "trainer.max_steps=6", processes=2)
    train(tmp_path / "first", "task.batch_size=4", "trainer.max_steps=3", processes=2)
    resumed = train(tmp_path / "resumed", "task.batch_size=4", "trainer.max_steps=6",
                    f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}", processes=2)
    assert resumed["steps"] == 6
    c_res, c_full = val_curve(tmp_path / "resumed"), val_curve(tmp_path / "full")
    assert max(c_res) == max(c_full)  # the validation at the end (step 6), logged by both
    assert c_res[max(c_res)] == pytest.approx(c_full[max(c_full)], rel=1e-6)
    w_res, w_full = (torch.load(tmp_path / d / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
                     for d in ("resumed", "full"))
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-6, atol=1e-7)
