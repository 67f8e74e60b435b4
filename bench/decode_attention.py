"""Softmax's decode-step attention by SDPA backend: one query row per (batch, head) against a full-capacity KV cache
under a padding mask (half of it written), as `SoftmaxAttention.step` runs it; bf16, timed from a CUDA graph (GPU
time, as `CUDAGraphs` decoding replays it). Why the graph-replayed step prefers cuDNN (src/attention/softmax.py).

    python3 bench/decode_attention.py [--heads 8] [--head-dim 32]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}


def graph_us(fn, calls=200, per_graph=20) -> float:
    """Microseconds per call of ``fn``, replayed from a CUDA graph of ``per_graph`` calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(per_graph):
            fn()
    g.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(calls // per_graph):
        g.replay()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / calls * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bf16, H={a.heads}, d={a.head_dim}")
    for B in (1, 16, 256):
        for cap in (1024, 4096):
            q = torch.randn(B, a.heads, 1, a.head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(B, a.heads, cap, a.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            mask = (torch.arange(cap, device="cuda") < cap // 2).expand(B, 1, 1, cap)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
            row = [f"B={B:3d} cache={cap:5d}"]
            for name, backend in BACKENDS.items():
                def call(backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                try:
                    err = ((call().float() - ref).norm() / ref.norm()).item()
                    row.append(f"{name} {graph_us(call):7.1f} us (rel. err {err:.1e})")
                except RuntimeError as e:  # a backend that does not take these inputs
                    row.append(f"{name} n/a ({str(e).splitlines()[0][:60]})")
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
