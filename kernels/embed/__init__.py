"""``embed_step``: one token per row through ``transformer.Embedding`` (token row x scale + position row) in one
launch, for decoding (kernel.py says why), with dispatch."""
from __future__ import annotations

import torch

from .. import use_triton
from .reference import embed_step_ref


def embed_step(tokens, table, scale: float, positions, pos, backend: str = "auto") -> torch.Tensor:
    """tokens (B,) -> (B, D) in the table's dtype. ``pos``: an int or a 0-d integer tensor (on the device)."""
    if table.shape[1] != positions.shape[1] or tokens.dim() != 1:
        raise ValueError(f"embed_step: tokens {tuple(tokens.shape)} (want (B,)), table {tuple(table.shape)}, "
                         f"positions {tuple(positions.shape)} do not fit")
    if not use_triton(backend, tokens, table) or table.stride(1) != 1 or positions.stride(1) != 1:
        return embed_step_ref(tokens, table, scale, positions, pos)
    from .kernel import launch
    out = torch.empty(tokens.shape[0], table.shape[1], device=table.device,
                      dtype=torch.promote_types(table.dtype, positions.dtype))
    return launch(tokens, table, scale, positions, pos, out)


__all__ = ["embed_step", "embed_step_ref"]
