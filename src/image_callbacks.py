"""Image samples during and after training: unconditional samples and completions of the top half of test images,
drawn through ``attnlab.decoding``, saved as PNG grids, logged to wandb, and timed (images per second, the paper's
Tables 1/2 throughput column).

Decoding modes (``mode``):

- ``state``: the network's own incremental form: the recurrent state of linear attention / MemSizer / Performer, the
  KV cache of softmax attention (the paper's "stateful-softmax"), Reformer's growing key store; on a GPU, fixed-size
  states step through a CUDA graph (``attnlab.decoding.CUDAGraphs``: the same kernels, one launch per token);
- ``recompute``: no cache, every step re-runs the parallel form over the whole prefix (the paper's "softmax" row).

Both draw the same images from the same weights and seed (up to floating-point rounding of the logits).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from .attention import ConfigError
from .decoding import CUDAGraphs, Recompute, sample
from .io import atomic_write

log = logging.getLogger("attnlab")
MODES = ("state", "recompute")


def decoder_for(net, mode: str):
    """The model ``attnlab.decoding`` steps through for a decoding mode."""
    if mode not in MODES:
        raise ConfigError(f"unknown sampling mode {mode!r}. Fix: `callbacks.image_samples.mode=state` (recurrent "
                          f"state / KV cache) or `=recompute` (no cache)")
    net = getattr(net, "_orig_mod", net)  # torch.compile wrapper: step through the module itself
    return CUDAGraphs(net) if mode == "state" else Recompute(net)


@torch.no_grad()
def sample_images(net, shape: tuple[int, int, int], n: int, mode: str = "state", prefix: torch.Tensor | None = None,
                  temperature: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Draw ``n`` images of ``shape`` (H, W, C) as uint8 (n, H, W, C); with ``prefix`` (n, t) of pixel values,
    complete those first t tokens. Returns (images, seconds)."""
    device = next(net.parameters()).device
    T = math.prod(shape)
    start = torch.full((n, 1), net.bos, dtype=torch.long, device=device)
    if prefix is not None:
        start = torch.cat([start, prefix.to(device).long()], 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    new = sample(decoder_for(net, mode), start, T + 1 - start.shape[1], temperature=temperature, generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    tokens = torch.cat([start[:, 1:], new], 1)
    return tokens.view(n, *shape).to(torch.uint8).cpu(), seconds


def grid(images: np.ndarray, n_cols: int, pad: int = 1) -> np.ndarray:
    """uint8 (N, H, W, C) -> one RGB uint8 mosaic, row-major, ``pad`` pixels of mid-grey between images."""
    N, H, W, C = images.shape
    if C == 1:
        images = np.repeat(images, 3, axis=-1)
    n_rows = -(-N // n_cols)
    out = np.full((n_rows * (H + pad) + pad, n_cols * (W + pad) + pad, 3), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, n_cols)
        out[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img
    return out


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> None:
    """Write an RGB uint8 array as a PNG atomically (``attnlab.io.atomic_write``)."""
    import matplotlib.image

    if scale > 1:
        array = array.repeat(scale, 0).repeat(scale, 1)
    atomic_write(path, lambda f: matplotlib.image.imsave(f, array, format="png"))


class ImageSamples(pl.Callback):
    """Samples after testing (the final model) and, with ``every_n_validations`` > 0, after every n-th validation.

    Writes ``{dirpath}/{tag}_unconditional.png`` (``n_images`` samples) and ``{dirpath}/{tag}_completion.png``
    (``n_complete`` test images spread over the set: the originals on top, below them the model's completion of
    their lower half), logs ``{split}/images_per_sec`` (unconditional sampling, ``n_images`` in one batch, in
    ``mode``) and the grids as wandb images when a WandbLogger is present. ``timing_modes``: further modes whose
    unconditional sampling is timed too, logged as ``{split}/images_per_sec_{mode}`` (softmax: the KV cache and no
    cache from one model)."""

    def __init__(self, dirpath: str, n_images: int = 16, n_complete: int = 8, mode: str = "state",
                 timing_modes: list[str] | tuple[str, ...] = (), temperature: float = 1.0,
                 every_n_validations: int = 0, seed: int = 0, scale: int = 4):
        for m in (mode, *timing_modes):  # a config error at build time, not after training
            if m not in MODES:
                decoder_for(None, m)
        self.dirpath, self.n_images, self.n_complete, self.mode = dirpath, n_images, n_complete, mode
        self.timing_modes = [m for m in timing_modes if m != mode]
        self.temperature, self.every, self.seed, self.scale = temperature, every_n_validations, seed, scale
        self._validations = 0

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.every <= 0:
            return
        self._validations += 1
        if self._validations % self.every == 0:
            self.draw(trainer, pl_module, "val", f"step{trainer.global_step:07d}")

    def on_test_epoch_end(self, trainer, pl_module):
        self.draw(trainer, pl_module, "test", "test")

    def draw(self, trainer, pl_module, split: str, tag: str) -> dict:
        dm = trainer.datamodule
        net, shape = pl_module.net, dm.image_shape
        H, W, C = shape
        was_training = net.training
        net.eval()
        try:
            # completions first: they also warm up (kernels, allocator) before the timed unconditional samples
            # spread over the test set (a subset sorted by class would otherwise show one digit only)
            test = dm.dataset("test").tokens
            originals = test[torch.linspace(0, len(test) - 1, min(self.n_complete, len(test))).long()]
            top = (H // 2) * W * C
            completed, _ = sample_images(net, shape, len(originals), self.mode, prefix=originals[:, :top],
                                         temperature=self.temperature, seed=self.seed + 1)
            images, seconds = sample_images(net, shape, self.n_images, self.mode, temperature=self.temperature,
                                            seed=self.seed)
            times = {self.mode: seconds}
            for m in self.timing_modes:
                times[m] = sample_images(net, shape, self.n_images, m, temperature=self.temperature,
                                         seed=self.seed)[1]
        finally:
            net.train(was_training)
        for m, secs in times.items():
            rate = self.n_images / secs
            pl_module.log(f"{split}/images_per_sec" + ("" if m == self.mode else f"_{m}"), rate)
            log.info("%s: %d images in %.2f s (%.2f images/s, mode=%s)", tag, self.n_images, secs, rate, m)
        if trainer.global_rank != 0:
            return {}
        paths = {
            "unconditional": Path(self.dirpath) / f"{tag}_unconditional.png",
            "completion": Path(self.dirpath) / f"{tag}_completion.png",
        }
        save_png(grid(images.numpy(), math.ceil(math.sqrt(self.n_images))), paths["unconditional"], self.scale)
        pairs = torch.cat([originals.view(-1, H, W, C).to(torch.uint8), completed])
        save_png(grid(pairs.numpy(), len(originals)), paths["completion"], self.scale)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                for kind, path in paths.items():
                    logger.log_image(key=f"samples/{kind}", images=[str(path)], caption=[tag],
                                     step=trainer.global_step)
        return paths
