"""Top-k feed-forward layer (Gupta et al., 2021): the FFN read as attention whose keys are the rows of W1 and
whose values are the columns of W2. Per token only the k largest hidden pre-activations h = W1 x + b1 are kept:

    y = W2[:, top_k(h)] relu(h[top_k(h)]) + b2

Tokens run in chunks and the backward recomputes, so training keeps O(N * k) per layer instead of the
O(N * d_ff) hidden activations of a dense FFN. Parameters are named like ``transformer.FeedForward``
(fc1, fc2), so a dense-FFN checkpoint loads unchanged; with k >= d_ff it is exactly the dense FFN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def topk_ffn_dense(x, w1, b1, w2, b2, k: int):
    """The definition on the full (N, d_ff) hidden matrix, plain autograd. No dropout. x: (..., D)."""
    h = F.linear(x, w1, b1)
    idx = h.topk(min(k, h.shape[-1]), dim=-1).indices
    kept = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, idx, True)
    return F.linear(F.relu(h) * kept, w2, b2)


class TopkFFNFunction(torch.autograd.Function):
    """x (N, D); w1 (F, D); b1 (F,); w2 (D, F); b2 (D,). Saves x, the weights, and per token the k kept
    pre-activations, their indices (int32) and the dropout keep-mask."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, k, chunk_size, dropout_p, save):
        N = x.shape[0]
        out = x.new_empty(N, w2.shape[0])
        H = x.new_empty(N, k) if save else None
        I = torch.empty(N, k, dtype=torch.int32, device=x.device) if save else None
        keep = torch.empty(N, k, dtype=torch.bool, device=x.device) if save and dropout_p > 0 else None
        for n0 in range(0, N, chunk_size):
            n1 = min(n0 + chunk_size, N)
            h = torch.addmm(b1, x[n0:n1], w1.t())                  # (C, F): the only hidden block alive
            top, idx = h.topk(k, dim=-1, sorted=False)
            a = top.relu()
            if save:
                H[n0:n1], I[n0:n1] = top, idx
            if dropout_p > 0:
                m = torch.rand_like(a) >= dropout_p
                if save:
                    keep[n0:n1] = m
                a = a * m / (1.0 - dropout_p)
            out[n0:n1] = torch.addmm(b2, h.zero_().scatter_(-1, idx, a), w2.t())
        if save:
            ctx.save_for_backward(x, w1, w2, H, I, keep)
            ctx.chunk_size, ctx.dropout_p = chunk_size, dropout_p
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, H, I, keep = ctx.saved_tensors
        if H is None:
            raise RuntimeError("TopkFeedForward: the forward ran without grad; run it with grad enabled")
        C, p = ctx.chunk_size, ctx.dropout_p
        dx, dw1, dw2 = torch.empty_like(x), torch.zeros_like(w1), torch.zeros_like(w2)
        db1 = w1.new_zeros(w1.shape[0])
        for n0 in range(0, x.shape[0], C):
            n1 = min(n0 + C, x.shape[0])
            top, idx, g = H[n0:n1], I[n0:n1].long(), dout[n0:n1]
            buf = g @ w2                                             # d(hidden after relu): (C, F)
            da = buf.gather(-1, idx)
            a = top.relu()
            if keep is not None:
                m = keep[n0:n1] / (1.0 - p)
                a, da = a * m, da * m
            buf.zero_().scatter_(-1, idx, a)                         # the sparse hidden activations
            dw2 += g.t() @ buf
            buf.zero_().scatter_(-1, idx, da * (top > 0))            # d(pre-activation), relu'(0) = 0 as torch
            dx[n0:n1] = buf @ w1
            dw1 += buf.t() @ x[n0:n1]
            db1 += buf.sum(0)
        return dx, dw1, db1, dw2, dout.sum(0), None, None, None, None


class TopkFeedForward(nn.Module):
    """Drop-in for ``transformer.FeedForward(d_model, d_ff, dropout)``: (B, T, D) -> (B, T, D)."""

    def __init__(self, d_model: int, d_ff: int, k: int, chunk_size: int = 1024, dropout: float = 0.0):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopkFeedForward: k (hidden units kept per token) must be a positive int, got {k!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"TopkFeedForward: chunk_size (tokens per chunk) must be a positive int, "
                             f"got {chunk_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TopkFeedForward: dropout must be in [0, 1), got {dropout}")
        self.fc1, self.fc2, self.dropout = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model), nn.Dropout(dropout)
        self.k, self.chunk_size = k, chunk_size

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        params = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
        p = self.dropout.p if self.training else 0.0
        y = TopkFFNFunction.apply(x, *params, min(self.k, self.fc1.out_features), self.chunk_size, p, save)
        return y.view(shape)

    def extra_repr(self) -> str:
        return f"k={self.k}, chunk_size={self.chunk_size}"
