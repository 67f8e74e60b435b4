"""Programmatic dependent launch (Hopper and later) for the decode kernels, where a launch costs as much as the work.

With PDL a kernel may start while the one before it in the stream is still running: its programs do what needs
nothing from that kernel (load weights), then ``gdc_wait`` until the previous kernel has finished and its writes are
visible, then ``gdc_launch_dependents`` lets the next kernel start the same way. Waiting before releasing keeps the
overlap to one kernel: the previous kernel waited for its own predecessor before releasing us, so everything up to
it is complete once our wait returns. Rule for the kernels: before the wait, read only what the kernel before
cannot be writing (weights its caller declares static, e.g. ``ln_linear(..., static_weight=True)`` from the fused
decoder, whose weight copies change only between steps); write nothing. CUDA graphs capture the launches with their
programmatic edges.
``ATTNLAB_PDL=0`` in the environment turns it off (for timing with and without, or a driver that misbehaves).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4 on NVIDIA; elsewhere the kernels run without PDL
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _SUPPORTED = "launch_pdl" in CUDAOptions.__dataclass_fields__ and os.environ.get("ATTNLAB_PDL", "1") != "0"
except ImportError:  # pragma: no cover - depends on the Triton build
    _SUPPORTED = False


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: torch.Tensor) -> bool:
    """Whether a kernel on ``t``'s device launches with PDL (a CUDA device of compute capability >= 9.0)."""
    return _SUPPORTED and t.is_cuda and _capable(t.device.index if t.device.index is not None else 0)


def launch_options(t: torch.Tensor) -> dict:
    """Launch keyword arguments: ``launch_pdl`` where ``pdl(t)``; nothing elsewhere (older Triton, the interpreter)."""
    return {"launch_pdl": True} if pdl(t) else {}


@triton.jit
def wait_previous(PDL: tl.constexpr):
    """Wait for the previous kernel, then let the next one start (a no-op without PDL)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
