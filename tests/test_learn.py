"""The copy task is learned on the CPU within a budget of optimizer steps, and top-k attention drops into a softmax
checkpoint.

Slow: run with `pytest --runslow`. Budgets are counted in optimizer steps, not seconds, so the outcome does not
depend on the machine: data, initialisation and dropout are seeded, and the curve is the same on any CPU. Each run
stops as soon as validation accuracy (every 100 steps, 512 samples) reaches its target. Where each variant crossed its
target when the budgets were set (steps; the 2-core CI machine does ~25 steps/s with one thread) is in VARIANTS."""
import json

import pytest
from filelock import FileLock

from attnlab.train import run

LEARN = ["task.max_len=32", "logger=none", "trainer.accelerator=cpu", "trainer.val_check_interval=100",
         "trainer.enable_progress_bar=false", "task.val_size=512", "task.test_size=512",
         "+callbacks.target._target_=pytorch_lightning.callbacks.EarlyStopping", "+callbacks.target.monitor=val/acc",
         "+callbacks.target.mode=max", "+callbacks.target.patience=1000"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run per variant, shared by the tests below, also across test processes (pytest -n): the run
    folder lies in the base temp dir they share, and a lock makes a second process wait for the first's run."""
    shared = tmp_path_factory.getbasetemp().parent

    def get(attention, compose_cfg, overrides, target):
        """Train until val/acc >= target (then stop) or the step budget in ``overrides`` runs out."""
        out = shared / f"learn-{attention}"
        with FileLock(str(out) + ".lock"):
            if not (out / "results.json").exists():
                stop = f"+callbacks.target.stopping_threshold={target}"
                run(compose_cfg([f"attention={attention}", *LEARN, stop, *overrides], out=out))
        return json.loads((out / "results.json").read_text()), out
    return get


# (variant, its overrides, step budget, target val/acc). Copy task defaults: d_model 64, 2 layers, RAdam 3e-3 x0.1 at
# step 2500. Measured crossing points (val/acc every 100 steps; NOTES.md has the curves): softmax 0.955 at 2400 and
# 0.986 at 2600 (0.992 by 2800); top-k (a quarter of the 64 keys) 0.93 before the decay, 0.972 at 2600; linear 0.88
# at 3000, 0.90 at 3800, 0.918 at 5000 (it learns copying more slowly than softmax); MemSizer (32 decoder slots)
# does not learn copying well at this size: 0.51 at 1300, 0.60 at 2500, 0.68 at 4000.
# With test processes (pytest -n, --dist loadgroup) the runs go to two groups of about equal length, each group to
# one process, so both start at once and the short tests fill in around them; softmax's group holds the test that
# reuses its checkpoint.
GROUP = {"softmax": "learn-a", "topk": "learn-a", "linear": "learn-b", "memsizer": "learn-b"}
VARIANTS = [("softmax", [], 3500, 0.95), ("linear", [], 5000, 0.88), ("topk", ["attention.k=16"], 3500, 0.95),
            ("memsizer", ["attention.decoder.k=32"], 4000, 0.5)]


@pytest.mark.slow
@pytest.mark.parametrize("attention,overrides,budget,target",
                         [pytest.param(*v, id=v[0], marks=pytest.mark.xdist_group(GROUP[v[0]])) for v in VARIANTS])
def test_copy_task_is_learned_within_its_step_budget(trained, compose_cfg, attention, overrides, budget, target):
    results, _ = trained(attention, compose_cfg, [f"trainer.max_steps={budget}", *overrides], target)
    acc = results["metrics"]["val/acc"]
    print(f"{attention}: val/acc={acc:.4f} after {results['steps']} steps, {results['wall_time_s']:.0f}s")
    assert acc >= target, f"{attention} reached only {acc:.3f} per-symbol accuracy in {results['steps']} steps"


@pytest.mark.slow
@pytest.mark.xdist_group(GROUP["softmax"])
def test_softmax_checkpoint_evaluated_with_topk_loses_under_one_point(trained, compose_cfg, tmp_path):
    results, out = trained("softmax", compose_cfg, ["trainer.max_steps=3500"], 0.95)
    ckpt = next((out / "checkpoints").glob("step*.ckpt"))  # the best checkpoint: the one the test metrics used
    base = results["metrics"]["test/acc"]
    L = 64  # longest model input of the copy task with max_len=32
    swapped = run(compose_cfg(["attention=topk", f"attention.k={L // 4}", "train=false", f"ckpt_path={ckpt}",
                               *LEARN], out=tmp_path / "topk"))
    acc = swapped["metrics"]["test/acc"]
    print(f"softmax checkpoint: test/acc {base:.4f} with softmax, {acc:.4f} with top-{L // 4}")
    assert acc > base - 0.01
