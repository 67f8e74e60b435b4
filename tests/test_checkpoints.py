"""Checkpoints, resuming, output dirs, bad inputs (issue #8): a run loses nothing and trusts nothing it should not."""
import functools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnlab.attention import ConfigError
from attnlab.checkpointing import SLOW_WRITE_ENV, AtomicCheckpointIO, CheckpointWriteError, UnsafeCheckpointError
from attnlab.modules.lm import LMModule
from attnlab.train import build, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.net.d_model=16", "model.net.n_heads=2", "model.net.d_ff=32", "model.net.n_layers=1",
        "task.max_len=6", "task.batch_size=4", "task.val_size=8", "task.test_size=8"]
QUIET = ["logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
COMMON = [*QUIET, "trainer.val_check_interval=4", "test=false", "model.net.dropout=0.2", *TINY]


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_weights(a, b):
    a, b = _ckpt(a)["state_dict"], _ckpt(b)["state_dict"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- 1. loading runs no code ----------------------------------------------------------------------------------------
def test_our_checkpoints_load_weights_only_and_last_is_the_latest_state(compose_cfg, tmp_path):
    """last.ckpt is written at the end even when the monitored metric never improves (lr=0: val/acc is flat), the
    best follows `monitor` (the first validation), and the whole Lightning state loads with weights_only=True."""
    res = run(compose_cfg([*COMMON, "trainer.max_steps=10", "model.optimizer.lr=0"], out=tmp_path))
    last = _ckpt(tmp_path / "checkpoints/last.ckpt")  # raises if anything but plain data is inside
    assert res["steps"] == 10 and last["global_step"] == 10
    assert {"loops", "callbacks", "optimizer_states", "lr_schedulers", "hyper_parameters"} <= last.keys()
    assert last["attnlab"]["attention_roles"]["decoder"]["name"] == "linear"
    assert [p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt")] == ["step0000004.ckpt"]
    assert _ckpt(tmp_path / "checkpoints/step0000004.ckpt")["global_step"] == 4


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a crafted file does: run code while it is unpickled
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("payload", ["evil", "partial"])
def test_a_checkpoint_that_runs_code_is_refused(compose_cfg, tmp_path, payload):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    obj = _Evil(marker) if payload == "evil" else functools.partial(torch.optim.Adam, lr=1e-3)  # an old checkpoint
    torch.save({"state_dict": {}, "hyper_parameters": {"optimizer": obj}}, bad)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"(?s)run code.*trust_checkpoint=true") as e:
        run(compose_cfg([*QUIET, *TINY, "train=false", f"ckpt_path={bad}"], out=tmp_path / "run"))
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert payload != "partial" or "functools.partial" in str(e.value)


# -- 2. last.ckpt on SIGTERM / Ctrl-C, and the resume from it is exact ----------------------------------------------
def _stop_at_step_6(monkeypatch, sig):
    def send(self, outputs, batch, batch_idx):
        if self.global_step == 6:
            os.kill(os.getpid(), sig)
    monkeypatch.setattr(LMModule, "on_train_batch_end", send, raising=False)


def test_signal_saves_last_and_exits_nonzero_and_resume_is_exact(compose_cfg, tmp_path, monkeypatch):
    run(compose_cfg([*COMMON, "trainer.max_steps=10"], out=tmp_path / "full"))
    for sig in (signal.SIGINT, signal.SIGTERM):  # a first Ctrl-C stops like SIGTERM (preemption) does
        _stop_at_step_6(monkeypatch, sig)
        with pytest.raises(SystemExit) as e:
            run(compose_cfg([*COMMON, "trainer.max_steps=10"], out=tmp_path / f"stopped{sig}"))
        monkeypatch.undo()
        assert e.value.code == 143
        last = tmp_path / f"stopped{sig}/checkpoints/last.ckpt"
        assert _ckpt(last)["global_step"] == 6  # saved at the stop, not at the last validation (4)
        results = json.loads((tmp_path / f"stopped{sig}/results.json").read_text())
        assert results["status"] == "interrupted" and results["steps"] == 6
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    run(compose_cfg([*COMMON, "trainer.max_steps=10", f"ckpt_path={last}"], out=tmp_path / "resumed"))
    assert _same_weights(tmp_path / "full/checkpoints/last.ckpt", tmp_path / "resumed/checkpoints/last.ckpt")


# -- 3. atomic writes -----------------------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, target)
    real_save = torch.save

    def save_half_then_fail(obj, f):
        real_save(obj, f)
        f.truncate(10)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(CheckpointWriteError, match=str(target)):
        io.save_checkpoint({"w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(_ckpt(target)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# -- 4. a checkpoint that cannot be written stops the run at once ---------------------------------------------------
def test_unwritable_checkpoint_dir_fails_before_training(compose_cfg, tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoint folder should be")  # unwritable, even for root
    with pytest.raises(CheckpointWriteError, match=str(tmp_path / "checkpoints")):
        run(compose_cfg([*COMMON, "trainer.max_steps=10"], out=tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["steps"] == 0 and "checkpoints" in results["error"]


# -- 5. more than one pass over the training set; a resume with nothing to do ---------------------------------------
def test_resume_over_several_epochs_finishes_every_step(compose_cfg, tmp_path):
    common = [*COMMON, "task.train_size=40", "task.batch_size=4", "trainer.val_check_interval=5"]  # 10 batches/epoch
    full = run(compose_cfg([*common, "trainer.max_steps=30"], out=tmp_path / "full"))
    run(compose_cfg([*common, "trainer.max_steps=15"], out=tmp_path / "first"))
    last = tmp_path / "first/checkpoints/last.ckpt"
    resumed = run(compose_cfg([*common, "trainer.max_steps=30", f"ckpt_path={last}"], out=tmp_path / "resumed"))
    assert resumed["steps"] == 30 and "val/acc" in resumed["metrics"]
    assert resumed["metrics"] == full["metrics"]
    with pytest.raises(ConfigError, match=r"step 15 and trainer.max_steps=15: nothing left to train"):
        run(compose_cfg([*common, "trainer.max_steps=15", f"ckpt_path={last}"], out=tmp_path / "nothing"))


# -- 6. changed options on resume are applied and recorded ----------------------------------------------------------
def test_resume_with_a_lower_lr_and_another_schedule_trains_with_them(compose_cfg, tmp_path):
    run(compose_cfg([*COMMON, "trainer.max_steps=4"], out=tmp_path / "first"))
    last = tmp_path / "first/checkpoints/last.ckpt"
    res = run(compose_cfg([*COMMON, "trainer.max_steps=8", f"ckpt_path={last}", "model.optimizer.lr=1e-4",
                           "model.optimizer.weight_decay=0.01", "model.scheduler.milestones=[6]"],
                          out=tmp_path / "resumed"))
    assert res["optimizer"]["lr"] == pytest.approx(1e-5)  # 1e-4, x0.1 at step 6
    assert res["optimizer"]["weight_decay"] == 0.01
    assert res["metrics"]["train/lr"] == pytest.approx(1e-5)
    assert res["resume"]["changed"]["model.optimizer.lr"] == [3e-3, 1e-4]
    assert res["config"]["model"]["optimizer"]["lr"] == 1e-4
    with pytest.raises(ConfigError, match="model/optimizer"):
        run(compose_cfg([*COMMON, "trainer.max_steps=8", f"ckpt_path={last}", "model/optimizer=adamw"],
                        out=tmp_path / "other"))


# -- 7. each run its own output dir ---------------------------------------------------------------------------------
def test_two_runs_never_share_an_output_dir(compose_cfg, tmp_path, monkeypatch):
    run(compose_cfg([*QUIET, *TINY, "train=false", "test=false"], out=tmp_path))
    with pytest.raises(ConfigError, match="already belongs to another run"):
        run(compose_cfg([*QUIET, *TINY, "train=false", "test=false"], out=tmp_path))
    # a requeued Slurm job (same job id) continues in its folder; another job may not
    from attnlab.train import claim_output_dir
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    claim_output_dir(str(tmp_path / "slurm"))
    claim_output_dir(str(tmp_path / "slurm"))
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(ConfigError, match="already belongs to another run"):
        claim_output_dir(str(tmp_path / "slurm"))
    monkeypatch.delenv("SLURM_JOB_ID")
    # two processes started together, with the default run dir: two folders
    args = [sys.executable, str(ROOT / "train.py"), *QUIET, *TINY, "train=false", "test=false"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs), procs[0].stderr.read()[-2000:]
    runs = sorted((tmp_path / "outputs").glob("*/*/results.json"))
    assert len(runs) == 2


# -- 8. model.net.max_len is the user's when set ----------------------------------------------------------------------
def test_max_len_set_by_the_user_is_kept_and_too_small_is_an_error(compose_cfg):
    _, model, _ = build(compose_cfg([*QUIET, *TINY, "model.net.max_len=100"]))
    assert model.net.max_len == 100  # the task needs 12, the user asked for more
    _, model, _ = build(compose_cfg([*QUIET, *TINY]))
    assert model.net.max_len == 12  # unset: the data's
    with pytest.raises(ConfigError, match=r"model.net.max_len=4 but the data needs 12"):
        build(compose_cfg([*QUIET, *TINY, "model.net.max_len=4"]))


# -- 9. smaller ones -------------------------------------------------------------------------------------------------
def test_bad_trainer_option_names_it_and_leaves_no_folder(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "train.py", "trainer.max_steps=abc", *QUIET, f"hydra.run.dir={out}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert res.returncode != 0 and "trainer.max_steps='abc'" in res.stderr and "Fix" in res.stderr
    assert not out.exists(), "a run that failed on its config left its folder"


def test_attention_per_role_is_logged_and_a_changed_variant_is_named(compose_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="attnlab")
    run(compose_cfg([*QUIET, *TINY, "attention=memsizer", "attention.k=0", "train=false", "test=false"],
                    out=tmp_path / "memsizer"))
    assert "decoder: memsizer {" in caplog.text and "'k': 4" in caplog.text  # the decoder's own k wins over k=0
    run(compose_cfg([*COMMON, "attention=softmax", "trainer.max_steps=4"], out=tmp_path / "softmax"))
    last = tmp_path / "softmax/checkpoints/last.ckpt"
    caplog.clear()
    run(compose_cfg([*COMMON, "attention=linear", "trainer.max_steps=5", f"ckpt_path={last}"], out=tmp_path / "lin"))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "trained with attention" in r.message]
    assert warned and "decoder: softmax" in warned[0].message and "decoder: linear" in warned[0].message
    caplog.clear()
    run(compose_cfg([*QUIET, *TINY, "attention=linear", "train=false", f"ckpt_path={last}"], out=tmp_path / "eval"))
    infos = [r for r in caplog.records if "trained with attention decoder: softmax" in r.message]
    assert infos and infos[0].levelno == logging.INFO  # said, not warned: evaluating with another variant is a feature
    for mode in ("trainer.max_steps=5", "train=false"):  # a variant with other parameters: named, not a raw load error
        with pytest.raises(ConfigError, match=r"does not fit the model.*not in this model.*trained with attention "
                                              r"decoder: softmax.*builds decoder: memsizer"):
            run(compose_cfg([*COMMON, "attention=memsizer", mode, f"ckpt_path={last}"], out=tmp_path / mode.split("=")[0]))


def test_generate_with_an_empty_prefix_is_a_clear_error(compose_cfg):
    _, model, _ = build(compose_cfg([*QUIET, *TINY]))
    with pytest.raises((ValueError, ConfigError), match="prefix"):
        model.net.generate(torch.zeros(2, 0, dtype=torch.long), 3)


# -- fault injection: SIGKILL at random moments, also mid-write; every resume ends like the uninterrupted run ---------
FAULT = [*QUIET, *TINY, "test=false", "trainer.max_steps=40", "trainer.val_check_interval=5", "model.net.dropout=0.2"]


def _train(out, *args, env=None):
    log = open(f"{out}.log", "wb")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FAULT, f"hydra.run.dir={out}", *args],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=log)


def _wait_for(pred, proc, timeout=600):
    end = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None or time.monotonic() > end:
            return False
        time.sleep(0.005)  # polling the file system
    return True


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path):
    rng = random.Random(os.environ.get("ATTNLAB_FAULT_SEED", "8"))
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    env = {"TMPDIR": str(systmp), SLOW_WRITE_ENV: "0.3"}  # each checkpoint write pauses halfway for 0.3 s
    ref = _train(tmp_path / "ref")
    latest, kills = None, []
    for n in range(1, 6):
        out = tmp_path / f"part{n}"
        proc = _train(out, *([f"ckpt_path={latest}"] if latest else []), env=env)
        ckpts = out / "checkpoints"
        if n <= 3 and _wait_for(lambda: (ckpts / "last.ckpt").exists(), proc):
            if n == 2:  # mid-write: a temp file is being filled
                _wait_for(lambda: any(ckpts.glob("*.tmp")), proc)
                kills.append("mid-write" if any(ckpts.glob("*.tmp")) else "late")
            else:
                time.sleep(rng.uniform(0, 1.5))  # a random moment
                kills.append("random")
            proc.kill()
        rc = proc.wait(timeout=600)
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, Path(f"{out}.log").read_text()[-3000:]
        if (ckpts / "last.ckpt").exists():
            latest = ckpts / "last.ckpt"
    assert rc == 0 and ref.wait(timeout=300) == 0, Path(f"{tmp_path / 'ref'}.log").read_text()[-3000:]
    assert kills.count("random") == 2 and "mid-write" in kills, kills
    final, expected = (json.loads((d / "results.json").read_text()) for d in (out, tmp_path / "ref"))
    assert final["steps"] == expected["steps"] == 40
    assert final["metrics"] == expected["metrics"]
    assert _same_weights(out / "checkpoints/last.ckpt", tmp_path / "ref/checkpoints/last.ckpt")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix == ".ckpt" and p.stat().st_size == 0], "0-byte checkpoint"
    assert not [p for p in files if p.name.endswith(".tmp")], "orphan temp files"
    assert not list(systmp.rglob("*")), "files went through the system temp dir"
