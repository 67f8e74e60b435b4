"""GPU kernels (Triton) for the hot paths, one folder per op, each with its pure-PyTorch reference beside it.

Dispatch: every op takes ``backend`` = ``"auto"`` (Triton on CUDA tensors when Triton imports, the reference
otherwise), ``"triton"`` (force; on CPU tensors this needs ``TRITON_INTERPRET=1``) or ``"torch"`` (the reference).
"""
from __future__ import annotations

import importlib.util
import os

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, *tensors) -> bool:
    """Decide whether an op runs its Triton kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but Triton is not installed: `pip install triton`")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
        return True
    return on_cuda and triton_available()
