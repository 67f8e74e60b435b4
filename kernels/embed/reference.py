"""PyTorch reference of the decode-step embedding: what ``transformer.Embedding`` computes for one token."""
from __future__ import annotations

import torch


def embed_step_ref(tokens, table, scale: float, positions, pos) -> torch.Tensor:
    """tokens (B,) -> table[tokens] * scale + positions[pos]: (B, D). ``pos``: an int or a 0-d tensor."""
    return table[tokens] * scale + positions[pos]
