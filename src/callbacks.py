"""Callbacks: learning curves written as a plot (and logged to wandb when it is a logger)."""
from __future__ import annotations

from collections import defaultdict

import pytorch_lightning as pl


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
