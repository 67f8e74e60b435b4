"""Callbacks: learning curves written as a plot (and logged to wandb when it is a logger); training throughput."""
from __future__ import annotations

import time
from collections import defaultdict

import pytorch_lightning as pl
import torch
import torch.distributed as dist


class LearningCurves(pl.Callback):
    """Records every scalar metric as it is logged, and at the end of fit draws loss/accuracy vs step to ``path``."""

    def __init__(self, path: str, every_n_steps: int = 10):
        self.path, self.every = path, every_n_steps
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def _record(self, trainer, prefix: str):
        for k, v in trainer.callback_metrics.items():
            if k.startswith(prefix) and v.numel() == 1:
                self.history[k].append((trainer.global_step, float(v)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self._record(trainer, "train/")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._record(trainer, "val/")

    def on_fit_end(self, trainer, pl_module):
        if not self.history or trainer.global_rank != 0:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kinds = sorted({k.split("/", 1)[1] for k in self.history})
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.4), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            for split in ("train", "val"):
                pts = self.history.get(f"{split}/{kind}")
                if pts:
                    ax.plot(*zip(*pts), label=split, marker="o" if split == "val" else None, ms=3)
            ax.set_xlabel("step"), ax.set_title(kind), ax.grid(alpha=0.3), ax.legend()
        fig.tight_layout()
        fig.savefig(self.path, dpi=110)
        plt.close(fig)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="learning_curves", images=[self.path])


def scored_tokens(batch, kind: str):
    """Non-padding target tokens of one batch (a 0-dim long tensor on the batch's device): what the loss scores."""
    if kind == "ctc" or "target_lengths" in batch:
        return batch["target_lengths"].sum()
    return (batch["targets"] != -100).sum()


class Throughput(pl.Callback):
    """Training tokens per second over a window of steps after ``warmup_steps`` (compilation, autotuning and the
    allocator's first growth excluded). Tokens are the scored target tokens, summed over ranks; the step time is the
    wall clock between the window's edges, where CUDA is synchronized (never inside the window, which would serialize
    the pipeline). Logs ``train/tokens_per_sec`` (global), ``train/tokens_per_sec_per_device`` and, on GPU,
    ``train/peak_memory_mb`` (this device's peak allocation; the maximum over ranks). ``window_steps`` null: measure
    up to the end of training. Enable with ``+callbacks.throughput._target_=attnlab.callbacks.Throughput``."""

    def __init__(self, warmup_steps: int = 10, window_steps: int | None = None):
        self.warmup, self.window = warmup_steps, window_steps
        self.tokens = None       # this rank's scored tokens inside the window (on the device: no sync per step)
        self.steps = 0           # optimizer steps inside the window
        self.start: float | None = None
        self.result: dict[str, float] = {}

    @staticmethod
    def _sync(module):
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_start(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def _measuring(self) -> bool:
        return self.start is not None and (self.window is None or self.steps < self.window)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None and trainer.global_step >= self.warmup:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._measuring():
            return
        n = scored_tokens(batch, getattr(pl_module, "batch_kind", ""))
        self.tokens = n if self.tokens is None else self.tokens + n
        self.steps += 1
        if self.window is not None and self.steps == self.window:
            self._finish(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.start is not None and not self.result:
            self._finish(trainer, pl_module)

    def _finish(self, trainer, pl_module):
        self._sync(pl_module)
        seconds = time.perf_counter() - self.start
        # one all_reduce of (tokens, seconds, peak): global tokens, the slowest rank's time, the largest peak
        tokens = torch.zeros(1, dtype=torch.float64, device=pl_module.device)
        if self.tokens is not None:
            tokens += self.tokens.to(tokens)
        stats = torch.tensor([seconds, self._peak_mb(pl_module)], dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(tokens)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        seconds, peak = float(stats[0]), float(stats[1])
        self.result = {"tokens": float(tokens[0]), "steps": self.steps, "seconds": seconds,
                       "tokens_per_sec": float(tokens[0]) / seconds,
                       "tokens_per_sec_per_device": float(tokens[0]) / seconds / trainer.world_size}
        if pl_module.device.type == "cuda":
            self.result["peak_memory_mb"] = peak
        for logger in trainer.loggers:  # outside a step: straight to the loggers, at the step the window ended
            logger.log_metrics({f"train/{k}": v for k, v in self.result.items() if k != "steps"},
                               step=trainer.global_step)
        if trainer.global_rank == 0:
            print(f"Throughput: {self.result}", flush=True)

    @staticmethod
    def _peak_mb(module) -> float:
        if module.device.type != "cuda":
            return 0.0
        return torch.cuda.max_memory_allocated(module.device) / 2**20
