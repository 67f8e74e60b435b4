"""Where a decode step's time goes: the generation model of bench_model.py (CIFAR-10 shape: 16 layers, d=256,
8 heads, FFN 1024) stepped through CUDAGraphs under autocast(bf16), fused (``Fused``) and not (issue #11).

    python3 bench/profile_decode.py [--variants linear memsizer] [--batch 16] [--config '{"BN_SMALL": 16}' ...]

Per variant and mode: wall ms per token over 200 replayed steps (images/s = batch / (3072 x that)), kernels per
step and GPU us per step from torch.profiler, and the top kernels. Each ``--config`` is a JSON override of the
ln_linear kernel's tiles (kernels/ln_linear/kernel.py: CONFIG), timed for the fused step. JSON to --out."""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import VARIANTS, decoder, time_steps  # noqa: E402  the benchmark's own generation model


@torch.no_grad()
def profile_point(variant, B, fuse, steps=200):
    from torch.profiler import ProfilerActivity, profile

    from attnlab.decoding import CUDAGraphs
    net = decoder(VARIANTS[variant], 3072 + 64, 256, 16, 8, 1024).eval()
    model = CUDAGraphs(net, fuse=fuse)
    tok = torch.randint(0, 256, (B,), device="cuda")
    state = model.init_state(B)
    per = time_steps(model, state, B, steps, warm=5)
    with torch.autocast("cuda", torch.bfloat16):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                model.step(tok, state)
            torch.cuda.synchronize()
    count, time_us = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            count[e.name[:90]] += 1
            time_us[e.name[:90]] += e.device_time
    return dict(variant=variant, B=B, fused=fuse, ms_per_token=1e3 * per, img_s=B / (3072 * per),
                kernels_per_step=sum(count.values()) / 10, gpu_us_per_step=sum(time_us.values()) / 10,
                top=[(k, n / 10, time_us[k] / 10) for k, n in count.most_common(12)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["linear", "memsizer"])
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--config", nargs="*", default=[], help="JSON overrides of kernels/ln_linear CONFIG")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()
    from attnlab.kernels.ln_linear import kernel
    base = dict(kernel.CONFIG)
    rows = []
    for v in args.variants:
        for B in args.batch:
            for fuse, cfg in [(False, "{}"), (True, "{}")] + [(True, c) for c in args.config]:
                kernel.CONFIG.clear()
                kernel.CONFIG.update(base, **json.loads(cfg))
                r = dict(profile_point(v, B, fuse), config=json.loads(cfg))
                rows.append(r)
                print(f"{v} B={B} fused={fuse} {cfg}: {r['ms_per_token']:.3f} ms/token, {r['img_s']:.2f} img/s, "
                      f"{r['kernels_per_step']:.0f} kernels, {r['gpu_us_per_step']:.0f} GPU us/step", flush=True)
                if cfg == "{}":
                    for name, n, us in r["top"]:
                        print(f"    {n:6.1f} {us:8.1f} us  {name}")
    os.makedirs(args.out, exist_ok=True)
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows),
              open(os.path.join(args.out, "decode_profile.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
