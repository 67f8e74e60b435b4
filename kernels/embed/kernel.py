"""The decode step's embedding in one launch: token rows times sqrt(d) plus the position's row. Eagerly it is
six small kernels (gather, scale, the position from a device tensor through arange / add / index_select, add),
a few percent of a fused step at batch 16. The position is read from memory when it is a tensor (a step captured
in a CUDA graph reads the position its replay was given)."""
from __future__ import annotations

import triton
import triton.language as tl

from ..pdl import launch_options, pdl, wait_previous


@triton.jit
def _embed_kernel(TOK, TABLE, POS_TABLE, POS, OUT, D, scale, pos, stok, st, sp, so,
                  POS_PTR: tl.constexpr, PDL: tl.constexpr, BD: tl.constexpr):
    wait_previous(PDL)
    b = tl.program_id(0)
    tok = tl.load(TOK + b * stok).to(tl.int64)
    if POS_PTR:
        pos = tl.load(POS)
    for d0 in range(0, D, BD):
        c = d0 + tl.arange(0, BD)
        m = c < D
        e = tl.load(TABLE + tok * st + c, mask=m, other=0.0) * scale \
            + tl.load(POS_TABLE + pos * sp + c, mask=m, other=0.0)
        tl.store(OUT + b * so + c, e.to(OUT.dtype.element_ty), mask=m)


def launch(tokens, table, scale, positions, pos, out):
    """tokens (B,) int, table (V, D), positions (L, D), pos int or 0-d int tensor, out (B, D)."""
    D = table.shape[1]
    ptr = not isinstance(pos, int)
    _embed_kernel[(tokens.shape[0],)](tokens, table, positions, pos if ptr else tokens, out, D, scale,
                                      0 if ptr else pos, tokens.stride(0), table.stride(0), positions.stride(0),
                                      out.stride(0),
                                      POS_PTR=ptr, PDL=pdl(out), BD=min(1024, triton.next_power_of_2(D)), num_warps=4,
                                      **launch_options(out))
    return out
