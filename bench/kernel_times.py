"""GPU time of one attention op's forward + backward, kernel by kernel, under chunk-kernel CONFIG overrides.

    PYTHONPATH=. python3 bench/kernel_times.py --out DIR [--ops linear memsizer fla] [--shapes 8,16,4096 1,8,16384]
        [--configs '{}' '{"programs": 8448}']

Each (op, shape B,H,T, config) is captured once in a CUDA graph (forward + backward, bf16, causal, D=64;
MemSizer: k=32 slots, values H*64 wide) and replayed: the total is the median replay time (L2 flushed), the
breakdown is torch.profiler's time per kernel name over the replays, and per launch in order (kernels_ms,
launches_ms). Host overhead is out of both: this is what the kernels cost, for choosing kernels/linear_attn/chunk.py's
CONFIG (kernels/NOTES.md). Writes kernel_times.json.

Ops: linear (elu+1 and the normalizer inside the kernels, as the models call it), linear_mapped (features mapped
before the timing, normalizer inside), linear_raw (attnlab's chunk kernels doing fla's math: mapped features, no
normalizer), fla (fla's chunk_linear_attn, normalize=False, mapped features), memsizer, topk (k = 64), sdpa
(default backend).
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import torch
import triton

from bench_attention import graphed  # bench/ is on sys.path when run as `python bench/kernel_times.py`


def make(op, B, H, T):
    """(inputs with requires_grad, fn) for one op at one shape."""
    dev, dt = "cuda", torch.bfloat16
    if op in ("linear", "linear_mapped"):  # linear_mapped: features mapped outside, the normalizer inside
        from attnlab.kernels.linear_attn import linear_attention
        fmap = "elu1" if op == "linear" else None
        xs = [torch.randn(B, H, T, 64, device=dev, dtype=dt) for _ in range(3)]
        xs[:2] = [x if fmap else x.sigmoid() for x in xs[:2]]
        return xs, lambda q, k, v: linear_attention(q, k, v, causal=True, feature_map=fmap, backend="triton")
    if op == "memsizer":
        from attnlab.kernels.memsizer import memsizer
        xs = [torch.randn(B, T, 32, device=dev).softmax(-1).to(dt) for _ in range(2)]
        xs.append(torch.randn(B, T, H * 64, device=dev, dtype=dt))
        return xs, lambda p, a, v: memsizer(p, a, v, causal=True, backend="triton")
    if op == "linear_raw":  # attnlab's chunk kernels doing fla's math: features mapped outside, no normalizer
        from attnlab.kernels.linear_attn.chunk import chunk_bwd, chunk_fwd

        class Raw(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                o, _, S0, z0 = chunk_fwd(q, k, v, causal=True, elu1=False, norm=False)
                ctx.save_for_backward(q, k, v, o, S0, z0)
                return o

            @staticmethod
            def backward(ctx, do):
                q, k, v, o, S0, z0 = ctx.saved_tensors
                return chunk_bwd(q, k, v, o, do, None, S0, z0, causal=True, elu1=False, norm=False)
        xs = [torch.randn(B, H, T, 64, device=dev, dtype=dt).sigmoid() for _ in range(2)]
        xs.append(torch.randn(B, H, T, 64, device=dev, dtype=dt))
        return xs, Raw.apply
    if op == "fla":  # fla's fastest form: features mapped outside, no normalizer
        from fla.ops.linear_attn import chunk_linear_attn
        xs = [torch.randn(B, T, H, 64, device=dev, dtype=dt).sigmoid() for _ in range(2)]
        xs.append(torch.randn(B, T, H, 64, device=dev, dtype=dt))
        return xs, lambda q, k, v: chunk_linear_attn(q, k, v, scale=1.0, normalize=False)[0]
    if op == "topk":  # top-k attention, k = 64, as the models call it
        from attnlab.kernels.topk_attn import topk_attention
        xs = [torch.randn(B, H, T, 64, device=dev, dtype=dt) for _ in range(3)]
        return xs, lambda q, k, v: topk_attention(q, k, v, 64, causal=True, backend="triton")
    if op == "sdpa":
        import torch.nn.functional as F
        xs = [torch.randn(B, H, T, 64, device=dev, dtype=dt) for _ in range(3)]
        return xs, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(f"unknown op {op!r}; expected linear, linear_mapped, linear_raw, memsizer, fla, topk or sdpa")


def point(op, B, H, T, reps):
    from torch.profiler import ProfilerActivity, profile
    xs, fn = make(op, B, H, T)
    for x in xs:
        x.requires_grad_(True)
    dy = torch.randn_like(fn(*xs))

    def call():
        for x in xs:
            x.grad = None
        fn(*xs).backward(dy)
    replay = graphed(call, warm=2)
    ms = triton.testing.do_bench(replay, warmup=25, rep=200)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            replay()
        torch.cuda.synchronize()
    per, launch = collections.Counter(), collections.Counter()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and e.device_time > 0),
                     key=lambda e: e.time_range.start)
    n = len(kernels) // reps  # kernels per replay: the i-th launch of a replay is i % n
    for i, e in enumerate(kernels):
        per[e.name[:90]] += e.device_time / reps / 1e3  # us -> ms
        launch[f"{i % n:02d} {e.name[:60]}"] += e.device_time / reps / 1e3
    return ms, dict(per.most_common()), dict(sorted(launch.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--ops", nargs="+", default=["linear", "memsizer", "fla", "sdpa"])
    ap.add_argument("--shapes", nargs="+", default=["8,16,4096", "8,16,16384", "4,8,4096", "1,8,16384"],
                    help="B,H,T (the op benchmark's 8,16,T; the model benchmark's 16384/T,8,T)")
    ap.add_argument("--configs", nargs="+", default=["{}"], help="JSON overrides of chunk.CONFIG (linear, memsizer)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import attnlab.kernels.linear_attn.chunk as chunk
    default = dict(chunk.CONFIG)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for shape in args.shapes:
        B, H, T = (int(n) for n in shape.split(","))
        for op in args.ops:
            for cfg in (args.configs if op.startswith(("linear", "memsizer")) else ["{}"]):
                chunk.CONFIG.clear()
                chunk.CONFIG.update(default, **json.loads(cfg))
                row = dict(op=op, B=B, H=H, T=T, config=json.loads(cfg))
                try:
                    row["ms"], row["kernels_ms"], row["launches_ms"] = point(op, B, H, T, args.reps)
                except Exception as e:  # noqa: BLE001 - recorded, the next point runs
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                torch.cuda.empty_cache()
                rows.append(row)
                top = " ".join(f"{k[:40]}={v:.3f}" for k, v in list(row.get("kernels_ms", {}).items())[:8])
                print(f"{op:9s} B={B} H={H:2d} T={T:6d} {cfg:40s} {row.get('ms', 0):.3f} ms  {row.get('error', top)}",
                      flush=True)
                with open(os.path.join(args.out, "kernel_times.json"), "w") as f:
                    json.dump(rows, f, indent=1)
    chunk.CONFIG.clear()
    chunk.CONFIG.update(default)


if __name__ == "__main__":
    main()
