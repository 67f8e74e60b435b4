"""Host (Python/launch) time per call of each layer of the attention op stacks, on tiny tensors where the GPU work is
negligible, and the host/GPU split of the whole training step (issue #11: the models were host-bound).

    python3 bench/host_overhead.py [--out DIR]

Host time of a call = wall time of N calls without synchronizing, divided by N (the launch queue never fills at these
sizes). Model step: the time until step() returns (host) against the time until the GPU is done (wall)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return 1e6 * host


def op_table():
    from attnlab.kernels.linear_attn import linear_attention
    from attnlab.kernels.linear_attn.chunk import chunk_bwd, chunk_fwd
    from attnlab.kernels.linear_attn.function import linear_attn_fwd
    from attnlab.kernels.memsizer import memsizer
    q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    o, r, S0, z0 = chunk_fwd(q, k, v, causal=True, elu1=True, norm=True)

    def fwd_bwd(f):
        def run():
            f().backward(do)
        return run

    rows = {
        "chunk_fwd (launcher + 1 kernel)": lambda: chunk_fwd(q, k, v, causal=True, elu1=True, norm=True),
        "chunk_bwd (launcher + 2 kernels)": lambda: chunk_bwd(q, k, v, o, do, r, S0, z0, causal=True, elu1=True,
                                                                norm=True),
        "custom op linear_attn_fwd": lambda: linear_attn_fwd(q, k, v, None, True, 1e-6, True),
        "linear_attention() fwd": lambda: linear_attention(q, k, v),
        "linear_attention() fwd+bwd": fwd_bwd(lambda: linear_attention(q, k, v)),
        "SDPA fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "SDPA fwd+bwd": fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }
    p, a, vv = (torch.randn(1, 64, n, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (32, 32, 512))
    dov = torch.randn(1, 64, 512, device="cuda", dtype=torch.bfloat16)
    rows["memsizer() fwd+bwd"] = lambda: memsizer(p, a, vv, True).backward(dov)
    out = {}
    for name, fn in rows.items():
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            out[name] = host_us(fn)
        print(f"{name:40s} {out[name]:8.1f} us host per call", flush=True)
    return out


def layer_table():
    """One attention module, fwd+bwd under autocast, d=512, 8 heads, B*T = 16384 x 1/16 (1024 tokens)."""
    from attnlab.attention import build_attention
    out = {}
    for name, cfg in [("softmax", {"name": "softmax"}), ("linear", {"name": "linear"}),
                      ("memsizer", {"name": "memsizer", "k": 32})]:
        m = build_attention(cfg, "decoder", 512, 8, 1024).cuda()
        x = torch.randn(1, 64, 512, device="cuda", requires_grad=True)

        def run():
            with torch.autocast("cuda", torch.bfloat16):
                y = m(x)
            y.float().sum().backward()
        out[name] = host_us(run, 200)
        print(f"layer {name:10s} fwd+bwd {out[name]:8.1f} us host per call", flush=True)
    return out


def step_table():
    """The whole training step of bench_model.py at T=1024: host time (until step() returns) against wall time."""
    from bench_model import train_point
    out = {}
    for variant in ("softmax", "linear", "memsizer"):
        r = train_point(variant, 1024, False, steps=5, warm=3)
        out[variant] = dict(host_ms=r["host_ms"], wall_ms=r["step_ms"])
        print(f"step {variant:10s} T=1024 host {r['host_ms']:.1f} ms, wall {r['step_ms']:.1f} ms", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()
    res = dict(device=torch.cuda.get_device_name(), ops=op_table(), layers=layer_table(), steps=step_table())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
