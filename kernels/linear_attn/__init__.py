"""Linear attention op: parallel (causal / bidirectional) and one-step recurrent forms, with dispatch."""
from __future__ import annotations

from .. import op_inputs, torch_math, upcast, use_triton
from ..fit import NoFit
from .reference import elu1, linear_attention_chunked_torch, linear_attention_ref, linear_attention_step_ref


def linear_attention(q, k, v, causal: bool = True, eps: float = 1e-6, feature_map: str | None = "elu1",
                     key_padding_mask=None, backend: str = "auto"):
    """Under autocast q, k, v are taken in the autocast dtype and the output comes back in it (kernels/__init__)."""
    q, k, v = op_inputs(q, k, v)
    if use_triton(backend, q, k, v):
        from .function import linear_attention_triton
        try:
            return linear_attention_triton(q, k, v, causal=causal, eps=eps, feature_map=feature_map,
                                           key_padding_mask=key_padding_mask)
        except NoFit:
            if backend == "triton":
                raise
    with torch_math():  # float32 states and normalizers on the PyTorch path too
        y = linear_attention_chunked_torch(*upcast(q, k, v), causal=causal, eps=eps, feature_map=feature_map,
                                           key_padding_mask=key_padding_mask)
    return y.to(q.dtype)


def linear_attention_step(q, k, v, S, z, eps: float = 1e-6, feature_map: str | None = "elu1", write=None,
                          backend: str = "auto"):
    # the step kernel holds a feature row in one tile: wider features (Performer's random features, d > 256 heads)
    # take the PyTorch step unless the kernel is forced, as the parallel op falls back on NoFit
    if use_triton(backend, q, k, v) and (backend == "triton" or q.shape[-1] <= 256):
        from .recurrent import linear_attention_step_triton
        return linear_attention_step_triton(q, k, v, S, z, eps=eps, feature_map=feature_map, write=write)
    return linear_attention_step_ref(q, k, v, S, z, eps=eps, feature_map=feature_map, write=write)


__all__ = ["linear_attention", "linear_attention_step", "linear_attention_ref", "linear_attention_chunked_torch", "linear_attention_step_ref", "elu1"]
