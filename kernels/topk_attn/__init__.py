"""Top-k attention op (Gupta et al., 2021): dispatch between the Triton kernel and the chunked PyTorch reference."""
from __future__ import annotations

from .. import op_inputs, use_triton
from ..fit import NoFit
from .reference import topk_attention_chunked, topk_attention_dense


def topk_attention(q, k, v, topk: int, causal: bool, key_padding_mask=None, chunk_size: int = 1024,
                   dropout_p: float = 0.0, scale=None, backend: str = "auto"):
    if dropout_p > 0 and backend == "triton":
        raise ValueError("topk_attention: the Triton kernel has no attention dropout; set the attention "
                         "dropout to 0 or use backend='auto' / 'torch' (the chunked PyTorch version has it)")
    # use_triton also validates `backend`; under auto, training with dropout, or a call the fused kernel does not
    # take (min(topk, S) <= 128, scale > 0, head dims <= 256), runs the chunked PyTorch path; a forced
    # backend="triton" gets the kernel's own error instead
    q, k, v = op_inputs(q, k, v)  # the autocast dtype under autocast (kernels/__init__.py)
    fits = min(topk, k.shape[2]) <= 128 and (scale is None or scale > 0) and max(q.shape[-1], v.shape[-1]) <= 256
    if use_triton(backend, q, k, v) and dropout_p == 0 and (fits or backend == "triton"):
        from .function import topk_attention_triton
        try:
            return topk_attention_triton(q, k, v, topk, causal, key_padding_mask=key_padding_mask,
                                         chunk_size=chunk_size, scale=scale)
        except NoFit:  # no tile configuration fits this device's shared memory (kernels/fit.py)
            if backend == "triton":
                raise
    return topk_attention_chunked(q, k, v, topk, causal, key_padding_mask=key_padding_mask, chunk_size=chunk_size,
                                  dropout_p=dropout_p, scale=scale)


__all__ = ["topk_attention", "topk_attention_chunked", "topk_attention_dense"]
