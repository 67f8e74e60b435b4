"""MemSizer op: the parallel (causal / bidirectional) read-out and its one-step recurrent form, with dispatch."""
from __future__ import annotations

from .. import op_inputs, torch_math, upcast, use_triton
from ..fit import NoFit
from .reference import memsizer_chunked_torch, memsizer_ref, memsizer_step_ref


def memsizer(p, a, v, causal: bool, key_padding_mask=None, backend: str = "auto"):
    """Under autocast p, a, v (softmax / LayerNorm outputs, float32 there) are taken in the autocast dtype and the
    output comes back in it; the memory and row scale stay float32 (kernels/__init__)."""
    p, a, v = op_inputs(p, a, v)
    if use_triton(backend, p, a, v):
        from .function import memsizer_triton
        try:
            return memsizer_triton(p, a, v, causal, key_padding_mask=key_padding_mask)
        except NoFit:
            if backend == "triton":
                raise
    # the chunked form of the reference: the same function, much faster than its (B, T, k, d) prefix sum
    with torch_math():
        y = memsizer_chunked_torch(*upcast(p, a, v), causal, key_padding_mask=key_padding_mask)
    return y.to(p.dtype)


def memsizer_step(p, a, v, S, count, write=None, backend: str = "auto"):
    if use_triton(backend, p, a, v):
        from .recurrent import memsizer_step_triton
        return memsizer_step_triton(p, a, v, S, count, write=write)
    return memsizer_step_ref(p, a, v, S, count, write=write)


__all__ = ["memsizer", "memsizer_step", "memsizer_ref", "memsizer_chunked_torch", "memsizer_step_ref"]
