"""Linear attention (Katharopoulos et al., 2020) in plain PyTorch: the reference every kernel is tested against.

    y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),   S_i = sum_j phi(k_j) v_j^T,   z_i = sum_j phi(k_j)

with j <= i (causal) or all j (bidirectional), phi(x) = elu(x) + 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def feature(x: torch.Tensor, feature_map: str | None) -> torch.Tensor:
    if feature_map is None:
        return x
    if feature_map == "elu1":
        return elu1(x)
    raise ValueError(f"unknown feature map {feature_map!r}; expected 'elu1' or None (inputs already mapped)")


def linear_attention_ref(q, k, v, causal: bool = True, eps: float = 1e-6, feature_map: str | None = "elu1",
                         key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k: (B, H, T, d); v: (B, H, S, dv); key_padding_mask: (B, S) bool, True = ignore. Returns (B, H, T, dv).

    The causal form is the cumulative-sum formulation: it holds a (T, d, dv) tensor, so it is a reference, not
    a fast path."""
    q, k = feature(q, feature_map), feature(k, feature_map)
    if key_padding_mask is not None:
        k = k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    if causal:
        kv = torch.einsum("bhtd,bhte->bhtde", k, v).cumsum(2)
        z = k.cumsum(2)
        num = torch.einsum("bhtd,bhtde->bhte", q, kv)
        den = torch.einsum("bhtd,bhtd->bht", q, z)
    else:
        kv = torch.einsum("bhsd,bhse->bhde", k, v)
        z = k.sum(2)
        num = torch.einsum("bhtd,bhde->bhte", q, kv)
        den = torch.einsum("bhtd,bhd->bht", q, z)
    return num / (den.unsqueeze(-1) + eps)


def linear_attention_step_ref(q, k, v, S, z, eps: float = 1e-6, feature_map: str | None = "elu1",
                              write: torch.Tensor | None = None):
    """One decoding step. q, k: (B, H, d); v: (B, H, dv); S: (B, H, d, dv); z: (B, H, d).

    ``write`` (B,) bool: rows whose key/value enter the state (False for padding tokens). Returns (y, S, z)."""
    q, k = feature(q, feature_map), feature(k, feature_map)
    if write is not None:
        k = k * write[:, None, None].to(k.dtype)
    S = S + k.unsqueeze(-1) * v.unsqueeze(-2)
    z = z + k
    y = torch.einsum("bhd,bhde->bhe", q, S) / (torch.einsum("bhd,bhd->bh", q, z).unsqueeze(-1) + eps)
    return y, S, z


def causal_dot_chunked(q, k, v, chunk: int = 64):
    """sum_{j <= t} (q_t . k_j) v_j for every t, chunk-wise in plain PyTorch: quadratic inside a chunk, a (d, dv)
    state carried across chunks. q, k (..., T, d); v (..., T, dv). Memory O(T/C * d * dv), no T x T tensor.
    Shared by linear attention (numerator and denominator) and MemSizer on the CPU / fallback path."""
    T = q.shape[-2]
    C = min(chunk, T)
    pad = (-T) % C
    if pad:  # zero keys/values add nothing; padded query rows are dropped below
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    N = q.shape[-2] // C
    qc, kc, vc = (t.reshape(*t.shape[:-2], N, C, t.shape[-1]) for t in (q, k, v))
    inner = (qc @ kc.transpose(-1, -2)).tril() @ vc        # causal inside each chunk
    kv = kc.transpose(-1, -2) @ vc                          # (..., N, d, dv): each chunk's contribution
    state = kv.cumsum(-3) - kv                              # the state before each chunk (exclusive prefix)
    out = inner + qc @ state
    return out.reshape(*out.shape[:-3], N * C, -1)[..., :T, :]


def linear_attention_chunked_torch(q, k, v, causal: bool = True, eps: float = 1e-6,
                                   feature_map: str | None = "elu1", key_padding_mask=None, chunk: int = 64):
    """The same function as ``linear_attention_ref`` computed chunk-wise (``causal_dot_chunked``): the CPU / fallback
    path, 10x faster than the cumsum form at small T and without its O(T * d * dv) memory."""
    if not causal:
        return linear_attention_ref(q, k, v, False, eps, feature_map, key_padding_mask)
    # contiguous first: under torch.compile (AOT autograd, torch 2.13 CPU) elu's backward on the (B, H, T, d) view
    # of a (B, T, H*d) projection gets other strides than traced, and a later view fails at run time
    q, k = feature(q.contiguous(), feature_map), feature(k.contiguous(), feature_map)
    if key_padding_mask is not None:
        k = k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    ones = v.new_ones(*v.shape[:-1], 1)  # the denominator phi(q).z_t is the numerator's sum with v = 1
    out = causal_dot_chunked(q, k, torch.cat([v, ones], -1), chunk)
    return out[..., :-1] / (out[..., -1:] + eps)


def exclusive_scan_ref(x, reverse: bool = False):
    """Exclusive sum over dim 0 (reverse: of the later entries), the definition chunk.exclusive_scan computes.
    Not cumsum - x: a huge entry would wipe out the others' digits in the subtraction."""
    if reverse:
        return torch.cat([x[1:].flip(0).cumsum(0).flip(0), torch.zeros_like(x[:1])])
    return torch.cat([torch.zeros_like(x[:1]), x[:-1].cumsum(0)])
