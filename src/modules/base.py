"""What every Lightning module of attnlab shares.

- Optimizer and schedule come from plain config mappings (``{"_target_": "torch.optim.RAdam", "lr": ...}``), built in
  ``configure_optimizers``: checkpoints hold data, never pickled callables, so they load with ``weights_only=True``.
- Randomness (dropout) is reseeded from (seed, rank, step) before every training step: a resumed run replays the
  uninterrupted one exactly, and ranks draw different dropout masks.
- The training loss is a sum over scored tokens divided by the count over *all* ranks (times the world size, since DDP
  averages gradients): W processes with batch B each train exactly like one with batch W*B.
- A non-finite loss stops training with a message listing only the fixes not already in the config.
- Evaluation metrics are torchmetrics objects per split (``self.metrics[split][name]``), computed across processes at
  the end of the epoch and logged as ``{split}/{name}``. A datamodule with several test sets names them in
  ``test_names`` (``["test", "test_real"]``, one per test dataloader, in order).

Subclasses set ``batch_kind`` and implement ``training_loss(batch) -> (loss_sum, n_scored)``, ``make_metrics()`` and
``evaluate(batch, split)``; ``derived(values)`` may add metrics computed from others (bits from loss, ...).
"""
from __future__ import annotations

import warnings

import hydra
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn

from ..attention import ConfigError

SPLITS = ("val", "test")
# Epoch metrics are torchmetrics objects, reduced across processes in compute(): every rank logs the same value, so
# Lightning's advice to add sync_dist=True (another all-reduce) does not apply.
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


class BaseModule(pl.LightningModule):
    batch_kind = ""

    def __init__(self, net: nn.Module, optimizer: dict, scheduler: dict | None = None,
                 scheduler_interval: str = "step", seed: int = 0, compile: bool | str = False):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        if compile:  # in place: the checkpoint keeps the network's own parameter names (no `_orig_mod.`)
            # a string is torch.compile's mode: "reduce-overhead" replays the steps from CUDA graphs (small models
            # are host-bound: bench/RESULTS.md), "max-autotune" also tunes the matmuls
            modes = list(torch._inductor.list_mode_options())
            if compile is not True and compile not in modes:
                raise ConfigError(f"model.compile={compile!r} is not a torch.compile mode. Fix: true, false or one "
                                  f"of {modes}")
            self.net.compile(**({} if compile is True else {"mode": compile}))
        self.metrics = nn.ModuleDict({split: self.make_metrics() for split in SPLITS})

    # -- what a subclass provides ---------------------------------------------------------------------------
    def make_metrics(self) -> nn.ModuleDict:
        raise NotImplementedError

    def training_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, batch, split: str) -> None:
        raise NotImplementedError

    def derived(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    # -- training ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        torch.manual_seed((self.hparams.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank)

    def _global(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t

    def training_step(self, batch, batch_idx):
        loss_sum, n = self.training_loss(batch)
        n_all = self._global(n.float()).clamp_min(1)
        loss = loss_sum * self.trainer.world_size / n_all
        mean = self._global(loss_sum.float()) / n_all  # the global mean, for the logs
        if not torch.isfinite(mean):
            raise FloatingPointError(self.nan_message(float(mean)))
        self.log("train/loss", mean, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def nan_message(self, value: float) -> str:
        """Only advice that changes something: a fix already in the config is not suggested again."""
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        fixes = [f"lower the learning rate (`model.optimizer.lr`, now {lr:g})"]
        if not self.trainer.gradient_clip_val:
            fixes.append("clip gradients (`trainer.gradient_clip_val=1.0`)")
        if "warmup" not in str((self.hparams.scheduler or {}).get("_target_", "")) + str(self.hparams.scheduler):
            fixes.append("warm up the learning rate (`model/scheduler=inverse_sqrt`)")
        if "32" not in str(self.trainer.precision) and "64" not in str(self.trainer.precision):
            fixes.append("train in full precision (`trainer.precision=32`)")
        return (f"loss is {value} at step {self.global_step}. Fix: " + "; ".join(fixes) +
                ". Resume from the last good checkpoint with `ckpt_path=.../checkpoints/last.ckpt` and the new "
                "options.")

    # -- evaluation -------------------------------------------------------------------------------------------
    def setup(self, stage: str):
        # Runs before Lightning moves the module to its device, so metrics added here follow it there.
        for name in self._test_names():
            if name not in self.metrics:
                self.metrics[name] = self.make_metrics()

    def _test_names(self) -> list[str]:
        dm = self.trainer.datamodule if self._trainer else None
        return list(getattr(dm, "test_names", SPLITS[1:]))

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, "val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.evaluate(batch, self._test_names()[dataloader_idx])

    def _log_split(self, split: str):
        values = {name: m.compute() for name, m in self.metrics[split].items() if m.update_called}
        if not values:
            return
        values.update(self.derived(values))
        self.log_dict({f"{split}/{k}": v.float() for k, v in values.items()}, prog_bar=split == "val")
        for m in self.metrics[split].values():
            m.reset()

    def on_validation_epoch_end(self):
        self._log_split("val")

    def on_test_epoch_end(self):
        for name in self._test_names():
            self._log_split(name)

    # -- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = hydra.utils.instantiate(self.hparams.optimizer, params=self.parameters())
        if not self.hparams.scheduler:  # None, or the empty model/scheduler=none
            return opt
        sched = hydra.utils.instantiate(self.hparams.scheduler, optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.hparams.scheduler_interval}}
