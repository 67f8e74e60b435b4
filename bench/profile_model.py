"""Where the time of one training step goes: the model of bench_model.py under torch.profiler (issue #11).

    python3 bench/profile_model.py --out DIR [--variants linear softmax] [--T 1024 8192] [--compile [--compile-mode M]]

For each variant and T: the wall time of a step (median), the GPU time inside it (the sum of its kernels), the host
time the Python/dispatcher side spends, the number of kernels launched and of dtype casts (aten::_to_copy), and the
top kernels and top host-side ops. A step whose wall time is well above its GPU time is host-bound: the GPU waits for
launches. Appends the tables to profile.txt and writes profile.json with the summary numbers."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import VARIANTS, batch, training_step  # noqa: E402  the same model and step as the benchmark


def profile_point(variant, T, compile_model, steps, warm):
    from torch.profiler import ProfilerActivity, profile
    model, step = training_step(variant, T, compile_model)
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    wall = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / steps
    kernels = sum(e.count for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA") / steps
    casts = sum(e.count for e in events if e.key == "aten::_to_copy") / steps
    host_us = sum(e.self_cpu_time_total for e in events) / steps
    table_gpu = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
    table_cpu = events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70)
    del model, step
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return dict(step_ms=1e3 * statistics.median(wall), gpu_ms=gpu_us / 1e3, host_ms=host_us / 1e3,
                kernels=kernels, casts=casts, tok_s=batch(T) * T / statistics.median(wall)), \
        table_gpu + "\n" + table_cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--T", nargs="+", type=int, default=[1024, 8192])
    ap.add_argument("--compile", action="store_true", help="profile under torch.compile as well")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode for --compile (reduce-overhead: CUDA graphs)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warm", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    summary = []
    for comp in ([False, True] if args.compile else [False]):
        for v in args.variants:
            for T in args.T:
                name = v + ("+compile" if comp else "")
                try:
                    r, text = profile_point(v, T, (args.compile_mode or True) if comp else False, args.steps,
                                            args.warm)
                except Exception as e:  # noqa: BLE001 - recorded; the next point still runs
                    r, text = dict(error=f"{type(e).__name__}: {str(e)[:300]}"), ""
                    torch.cuda.empty_cache()
                summary.append(dict(variant=name, T=T, **r))
                print(f"{name:18s} T={T:6d} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in r.items()), flush=True)
                with open(os.path.join(args.out, "profile.txt"), "a") as f:
                    f.write(f"\n\n===== {name} T={T} {r}\n{text}")
                with open(os.path.join(args.out, "profile.json"), "w") as f:
                    json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
