"""Checkpoints that lose nothing and trust nothing.

- ``AtomicCheckpointIO`` (a Lightning CheckpointIO plugin): every checkpoint is written by ``attnlab.io.atomic_write``
  (``<name>.<pid>.tmp`` beside its target, fsynced, renamed over it): a kill at any moment leaves either the old file
  or the new one, never a 0-byte or partial file, and never a temp file in the system temp dir (Lightning's default
  writes through fsspec's temp file, which is not atomic across filesystems). A failed write is an error at once,
  naming the path. Temp files of dead writers are removed at start.
- ``RunCheckpoint`` (a ModelCheckpoint): ``last.ckpt`` is always the latest state, written at every validation, at
  the end of training and when the run is stopped by SIGTERM (cluster preemption) or a first Ctrl-C (which asks for
  the same graceful stop; a second Ctrl-C aborts without saving). The best checkpoint follows ``monitor``.
- ``load_checkpoint``: ``torch.load(weights_only=True)``; a file that needs more (a pickled callable: code that runs
  while loading) is refused with a message naming the risk and the opt-in ``trust_checkpoint=true``.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
import signal
import threading
import time
from typing import Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .attention import ConfigError
from .io import TMP_NAME, AtomicWriteError, atomic_write

log = logging.getLogger("attnlab")

# Test hook: seconds to pause halfway through writing each checkpoint (lets a test kill the process mid-write).
SLOW_WRITE_ENV = "ATTNLAB_SLOW_CHECKPOINT_WRITE"


class CheckpointWriteError(AtomicWriteError):
    """A checkpoint could not be written: the run stops at once instead of training on without a way back."""


class UnsafeCheckpointError(ConfigError):
    """A checkpoint that only loads by running code (pickled callables) and was not marked as trusted."""


def write_checkpoint_file(path: str, data) -> None:
    """``attnlab.io.atomic_write``, failing with a ``CheckpointWriteError`` (the run stops at once)."""
    try:
        atomic_write(path, data)
    except AtomicWriteError as e:
        raise CheckpointWriteError(f"{e} Or point `paths.output_dir` elsewhere.") from e.__cause__


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(directory: str) -> list[str]:
    """Remove ``*.<pid>.tmp`` files of ours whose writer is no longer running (left by a kill mid-write)."""
    removed = []
    if not directory or not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        m = TMP_NAME.match(name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    if removed:
        log.info("removed unfinished checkpoint writes of stopped runs in %s: %s", directory, ", ".join(removed))
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save/torch.load checkpoint IO with atomic, fsynced writes beside the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        pause = float(os.environ.get(SLOW_WRITE_ENV) or 0)

        def write(f):
            if not pause:
                torch.save(checkpoint, f)
                return
            buf = io.BytesIO()
            torch.save(checkpoint, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(pause)
            f.write(data[len(data) // 2:])
        write_checkpoint_file(path, write)


def load_checkpoint(path: str, trust: bool = False) -> dict:
    """The checkpoint at ``path``, loaded without running code unless ``trust`` (``trust_checkpoint=true``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"ckpt_path={path} is not a file. Fix: give a checkpoint of an earlier run "
                          f"(outputs/<date>/<time>/checkpoints/last.ckpt).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust:
            log.warning("loading %s with weights_only=False (trust_checkpoint=true): it may run code", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
        what = f" (it refers to {found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"{path} holds more than tensors and plain data{what}: loading it would run code stored in the file, "
            f"which can do anything on this machine. It was refused. Fix: if (and only if) you trust where this "
            f"file comes from, rerun with `trust_checkpoint=true`.") from None


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is always the latest state (see the module docstring).

    ``run_info`` (plain data, e.g. the attention config) is stored in each checkpoint under ``"attnlab"``, so a resume
    or an evaluation can say what the checkpoint was trained with."""

    def __init__(self, *args, run_info: dict | None = None, **kwargs):
        kwargs.setdefault("save_last", True)
        super().__init__(*args, **kwargs)
        self.run_info = dict(run_info or {})
        self._last_step_written: int | None = None
        self._sigint_previous = None

    # -- where last.ckpt is written -------------------------------------------------------------------------------
    def _write_last(self, trainer) -> None:
        if trainer.global_step == self._last_step_written or trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_step_written = trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)  # the best (and last when that improved)
        if trainer.state.fn == "fit":
            self._write_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write_last(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        """SIGTERM (and our first Ctrl-C, turned into one) stops at the end of a training step: save that state.
        Other errors (a NaN loss, a failed write) keep the last good last.ckpt."""
        self._restore_sigint()  # Lightning skips the teardown hook when fit ends in an exception
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        if trainer.validating or trainer.sanity_checking:
            log.warning("stopped during validation: last.ckpt stays at step %s", self._last_step_written)
            return
        self._write_last(trainer)
        log.warning("stopped by a signal at step %d; saved %s", trainer.global_step, self.last_model_path)

    # -- checks at start, signals ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or trainer.fast_dev_run or not trainer.is_global_zero:
            return
        remove_stale_tmp(self.dirpath)
        probe = os.path.join(self.dirpath, ".write-test")  # fail now, not at the first validation
        write_checkpoint_file(probe, b"")
        os.remove(probe)

    def on_train_start(self, trainer, pl_module) -> None:
        # A first Ctrl-C asks for the graceful stop SIGTERM gets (Lightning stops at the end of the step). Installed
        # here, after Lightning has recorded the handlers it puts back when fit ends.
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._sigint_previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        log.warning("Ctrl-C: stopping after this step and saving last.ckpt (Ctrl-C again to abort without saving)")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGTERM)

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._sigint_previous is not None:
            signal.signal(signal.SIGINT, self._sigint_previous)
            self._sigint_previous = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["attnlab"] = self.run_info
