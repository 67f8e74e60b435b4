"""Numerical checks every attention variant should pass; used by the tests and handy when adding a variant."""
from __future__ import annotations

import torch

from .base import Attention


def random_padding(B: int, T: int, generator=None, side: str = "right") -> torch.Tensor:
    """A (B, T) key padding mask with a random number (0 .. T-1) of padded positions per row; row 0 unpadded."""
    n = torch.randint(0, max(T, 1), (B,), generator=generator)
    n[0] = 0
    pos = torch.arange(T)
    mask = pos[None, :] >= (T - n)[:, None] if side == "right" else pos[None, :] < n[:, None]
    return mask


@torch.no_grad()
def parallel_vs_recurrent(attn: Attention, B: int = 3, T: int = 9, S: int = 7, padding: bool = True,
                          dtype=torch.float64, seed: int = 0, side: str = "right") -> float:
    """Relative error between the parallel form and stepping token by token (decoder or cross role).

    Decoder self-attention is fed a padding mask on ``side`` (padded tokens are not written into the state);
    cross-attention gets a padded memory. Only outputs at real (non-padded) query positions are compared."""
    g = torch.Generator().manual_seed(seed)
    attn = attn.to(dtype).eval()
    D = attn.d_model
    x = torch.randn(B, T, D, generator=g, dtype=dtype)
    if attn.role == "cross":
        memory = torch.randn(B, S, D, generator=g, dtype=dtype)
        kpm = random_padding(B, S, g) if padding else None
        y = attn(x, memory, kpm)
        state = attn.init_state(B, memory, kpm)
        steps = [attn.step(x[:, t:t + 1], state)[0] for t in range(T)]
        valid = torch.ones(B, T, dtype=torch.bool)
    elif attn.role == "decoder":
        kpm = random_padding(B, T, g, side) if padding else None
        y = attn(x, None, kpm)
        state, steps = attn.init_state(B), []
        for t in range(T):
            yt, state = attn.step(x[:, t:t + 1], state, pad=None if kpm is None else kpm[:, t])
            steps.append(yt)
        valid = ~kpm if kpm is not None else torch.ones(B, T, dtype=torch.bool)
    else:
        raise ValueError("encoder self-attention has no recurrent form to compare")
    ys = torch.cat(steps, 1)
    return ((y - ys)[valid].norm() / y[valid].norm().clamp_min(1e-300)).item()


@torch.no_grad()
def prefill_vs_steps(attn: Attention, B: int = 3, T: int = 9, S: int = 7, bounds: tuple[int, ...] = (5,),
                     padding: bool = True, dtype=torch.float64, seed: int = 0, side: str = "right") -> float:
    """Relative error between stepping through T tokens and ``prefill`` in chunks [0, bounds[0]), [bounds[0],
    bounds[1]), ... followed by steps for the rest (decoder or cross role). The steps after the prefill check the
    state it returned; a second chunk checks prefill from a state that already holds keys. Padding as in
    ``parallel_vs_recurrent``; only outputs at real query positions are compared."""
    g = torch.Generator().manual_seed(seed)
    attn = attn.to(dtype).eval()
    D = attn.d_model
    x = torch.randn(B, T, D, generator=g, dtype=dtype)
    memory = kpm = None
    if attn.role == "cross":
        memory = torch.randn(B, S, D, generator=g, dtype=dtype)
        mpm = random_padding(B, S, g) if padding else None
    elif attn.role == "decoder":
        kpm = random_padding(B, T, g, side) if padding else None
        mpm = None
    else:
        raise ValueError("encoder self-attention has no recurrent form to compare")

    def pad(t0, t1):
        return None if kpm is None else kpm[:, t0:t1]

    state, ref = attn.init_state(B, memory, mpm), []
    for t in range(T):
        y, state = attn.step(x[:, t:t + 1], state, pad=None if kpm is None else kpm[:, t])
        ref.append(y)
    state, out, t0 = attn.init_state(B, memory, mpm), [], 0
    for t1 in bounds:
        y, state = attn.prefill(x[:, t0:t1], state, pad(t0, t1))
        out.append(y)
        t0 = t1
    for t in range(t0, T):
        y, state = attn.step(x[:, t:t + 1], state, pad=None if kpm is None else kpm[:, t])
        out.append(y)
    ref, out = torch.cat(ref, 1), torch.cat(out, 1)
    valid = ~kpm if kpm is not None else torch.ones(B, T, dtype=torch.bool)
    return ((ref - out)[valid].norm() / ref[valid].norm().clamp_min(1e-300)).item()
