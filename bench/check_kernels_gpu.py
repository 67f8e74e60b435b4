"""Full-size GPU check and timing of the linear-attention / MemSizer Triton kernels (kernels/NOTES.md has results).

    PYTHONPATH=. python3 bench/check_kernels_gpu.py [--sweep] [--no-check | --check-only] [--T 1024 4096 16384]

1. correctness at full size against float64 references on the GPU (NaN-poisoned buffers), bf16, B=8, H=16, D=64:
   causal T=1000 (exact reference; float32 and float16 too) and T=16384 (chunked float64 form), bidirectional/cross,
   padding, causal runs, features mapped outside (feature_map=None),
   MemSizer (k=32, d=1024) causal / cross, and the decode steps;
2. timings (triton.testing.do_bench, median, L2 flushed): causal linear attention fwd and fwd+bwd vs SDPA flash
   and vs the PyTorch chunked form, MemSizer, peak memory, and the decode steps in CUDA graphs;
3. --sweep: block sizes / warps / stages / causal runs (kernels.linear_attn.chunk.CONFIG) at two lengths.
A short table is printed last. Needs torch + triton only (no hydra / wandb)."""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
import triton

import attnlab.kernels.linear_attn.chunk as chunk
from attnlab.kernels.linear_attn.function import linear_attention_triton
from attnlab.kernels.linear_attn.recurrent import linear_attention_step_, linear_attention_step_triton
from attnlab.kernels.linear_attn.reference import linear_attention_chunked_torch, linear_attention_ref, \
    linear_attention_step_ref
from attnlab.kernels.memsizer.function import memsizer_triton
from attnlab.kernels.memsizer.recurrent import memsizer_step_, memsizer_step_triton
from attnlab.kernels.memsizer.reference import memsizer_ref, memsizer_step_ref

dev = "cuda"
LINES = []  # the summary table


def log(*a):
    print(*a, flush=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Poison:
    """NaN-fill every float buffer allocated through torch.empty / empty_like inside the block."""

    def __enter__(self):
        self.e, self.el = torch.empty, torch.empty_like

        def fill(t):
            return t.fill_(float("nan")) if t.is_floating_point() else t
        torch.empty = lambda *a, **k: fill(self.e(*a, **k))
        torch.empty_like = lambda *a, **k: fill(self.el(*a, **k))

    def __exit__(self, *exc):
        torch.empty, torch.empty_like = self.e, self.el


def record(name, errs, tol):
    ok = all(e == e and e < tol for e in errs.values())  # e == e: NaN fails
    s = " ".join(f"{k}={v:.2e}" for k, v in errs.items())
    log(f"  [{'ok' if ok else 'FAIL'}] {name}: {s}")
    LINES.append(("check", name, "ok" if ok else "FAIL", s))
    return ok


def grads_of(fn, xs, dy):
    y = fn(*xs)
    return (y, *torch.autograd.grad(y, xs, dy))


TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}


def check_linear(name, B, H, T, S, causal, mask_frac, ref, programs=None, dt=torch.bfloat16, D=64, dv=64,
                 feature_map="elu1"):
    """feature_map None: q, k are features, elu + 1 of normal samples (the kernels' ELU1 = 0 path)."""
    g = torch.Generator(device=dev).manual_seed(T + S)
    xs = [torch.randn(B, H, n, e, device=dev, generator=g) for n, e in ((T, D), (S, D), (S, dv))]
    if feature_map is None:
        xs[:2] = [F.elu(x) + 1 for x in xs[:2]]
    xs = [x.to(dt).requires_grad_() for x in xs]
    dy = torch.randn(B, H, T, dv, device=dev, generator=g).to(dt)
    mask = None
    if mask_frac:
        mask = torch.rand(B, S, device=dev, generator=g) < mask_frac
        mask[0] = False
        mask[-1, :5] = True
    old = dict(chunk.CONFIG)
    if programs is not None:  # force causal runs even on a short sequence
        chunk.CONFIG.update(programs=programs, run_min_chunks=0)
    with Poison():
        out = grads_of(lambda q, k, v: linear_attention_triton(q, k, v, causal=causal, key_padding_mask=mask,
                                                               feature_map=feature_map), xs, dy)
    chunk.CONFIG.update(old)
    torch.cuda.synchronize()
    x64 = [x.detach().double().requires_grad_() for x in xs]
    exp = grads_of(lambda q, k, v: ref(q, k, v, causal=causal, key_padding_mask=mask, feature_map=feature_map), x64,
                   dy.double())
    errs = dict(zip(("y", "dq", "dk", "dv"), (rel(a, b) for a, b in zip(out, exp))))
    del out, exp, x64
    torch.cuda.empty_cache()
    return record(name, errs, TOL[dt])


def check_memsizer(name, B, T, S, k, d, causal, mask_frac, dt=torch.bfloat16):
    g = torch.Generator(device=dev).manual_seed(T + S + 1)
    xs = [torch.randn(B, T, k, device=dev, generator=g).softmax(-1), torch.randn(B, S, k, device=dev, generator=g),
          torch.randn(B, S, d, device=dev, generator=g)]
    xs = [x.to(dt).requires_grad_() for x in xs]
    dy = torch.randn(B, T, d, device=dev, generator=g).to(dt)
    mask = None
    if mask_frac:
        mask = torch.rand(B, S, device=dev, generator=g) < mask_frac
        mask[0] = False
        mask[-1, :5] = True
    with Poison():
        out = grads_of(lambda p, a, v: memsizer_triton(p, a, v, causal, key_padding_mask=mask), xs, dy)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    exp = grads_of(lambda p, a, v: memsizer_ref(p, a, v, causal, key_padding_mask=mask), x64, dy.double())
    errs = dict(zip(("y", "dp", "da", "dv"), (rel(a, b) for a, b in zip(out, exp))))
    del out, exp, x64
    torch.cuda.empty_cache()
    return record(name, errs, 2e-2)


def check_steps():
    g = torch.Generator(device=dev).manual_seed(7)
    B, H, d = 64, 8, 64
    for sdt in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(B, H, d, device=dev, generator=g).to(sdt) for _ in range(3))
        S = torch.rand(B, H, d, d, device=dev, generator=g).to(sdt)
        z = (torch.rand(B, H, d, device=dev, generator=g) + 1).to(sdt)
        w = torch.rand(B, device=dev, generator=g) < 0.8
        with Poison():
            y, S1, z1 = linear_attention_step_triton(q, k, v, S, z, write=w)
        e = linear_attention_step_ref(*(t.double() for t in (q, k, v, S, z)), write=w)
        record(f"linear step {str(sdt)[6:]}", dict(zip(("y", "S", "z"), (rel(a, b) for a, b in zip((y, S1, z1), e)))),
               1e-5 if sdt == torch.float32 else 1e-2)
        p = torch.randn(B, 32, device=dev, generator=g).softmax(-1).to(sdt)
        a = torch.randn(B, 32, device=dev, generator=g).to(sdt)
        vv = torch.randn(B, H * d, device=dev, generator=g).to(sdt)
        M = torch.randn(B, 32, H * d, device=dev, generator=g).to(sdt)
        c = torch.full((B,), 100.0, device=dev)
        with Poison():
            y, M1, c1 = memsizer_step_triton(p, a, vv, M, c, write=w)
        e = memsizer_step_ref(*(t.double() for t in (p, a, vv, M, c)), write=w)
        record(f"memsizer step {str(sdt)[6:]}",
               dict(zip(("y", "S", "count"), (rel(a_, b_) for a_, b_ in zip((y, M1, c1), e)))),
               1e-5 if sdt == torch.float32 else 1e-2)


# ---------------------------------------------------------------------------------------------------------------

def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def fwd_bwd(fn, xs, dy):
    def run():
        for x in xs:
            x.grad = None
        fn(*xs).backward(dy)
    return run


def peak_mib(run):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def time_ops(Ts, B=8, H=16, D=64, slots=32, with_torch=True):
    rows = []
    for T in Ts:
        g = torch.Generator(device=dev).manual_seed(T)
        x = [torch.randn(B, T, H, D, device=dev, generator=g, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
             for _ in range(3)]  # (B, H, T, D) views of (B, T, H, D), as split_heads makes them
        dy = torch.randn(B, H, T, D, device=dev, generator=g, dtype=torch.bfloat16)
        ms_x = [torch.randn(B, T, slots, device=dev, generator=g).softmax(-1).to(torch.bfloat16).requires_grad_(),
                torch.randn(B, T, slots, device=dev, generator=g).to(torch.bfloat16).requires_grad_(),
                torch.randn(B, T, H * D, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_()]
        ms_dy = torch.randn(B, T, H * D, device=dev, generator=g, dtype=torch.bfloat16)
        ops = {"linear_triton": (lambda q, k, v: linear_attention_triton(q, k, v, causal=True), x, dy),
               "sdpa_flash": (sdpa, x, dy),
               "memsizer_triton": (lambda p, a, v: memsizer_triton(p, a, v, True), ms_x, ms_dy)}
        if with_torch and T <= 4096:
            ops["linear_torch_chunked"] = (lambda q, k, v: linear_attention_chunked_torch(q, k, v, True), x, dy)
        for name, (fn, xs, d_) in ops.items():
            try:
                with torch.no_grad():
                    f = bench(lambda: fn(*xs))
                run = fwd_bwd(fn, xs, d_)
                fb = bench(run)
                mem = peak_mib(run)
            except torch.cuda.OutOfMemoryError:
                f = fb = mem = float("nan")
                torch.cuda.empty_cache()
            rows.append((name, T, f, fb, mem))
            log(f"  {name:22s} T={T:6d}  fwd {f:8.3f} ms  fwd+bwd {fb:8.3f} ms  peak {mem:8.0f} MiB")
        del x, ms_x, dy, ms_dy
        torch.cuda.empty_cache()
    return rows


def time_decode():
    B, H, d, slots = 64, 8, 64, 32
    out = []
    for sdt in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(B, H, d, device=dev, dtype=sdt) for _ in range(3))
        S, z = torch.rand(B, H, d, d, device=dev, dtype=sdt), torch.rand(B, H, d, device=dev, dtype=sdt) + 1
        y = torch.empty(B, H, d, device=dev, dtype=sdt)
        p = torch.randn(B, slots, device=dev).softmax(-1).to(sdt)
        a = torch.randn(B, slots, device=dev).to(sdt)
        vv = torch.randn(B, H * d, device=dev, dtype=sdt)
        M = torch.rand(B, slots, H * d, device=dev, dtype=sdt)
        c = torch.full((B,), 100.0, device=dev)
        ym = torch.empty(B, H * d, device=dev, dtype=sdt)
        cases = {"linear_step_ (in place)": lambda: linear_attention_step_(q, k, v, S, z, y),
                 "linear_step (functional)": lambda: linear_attention_step_triton(q, k, v, S, z),
                 "memsizer_step_ (in place)": lambda: memsizer_step_(p, a, vv, M, c, ym),
                 "memsizer_step (functional)": lambda: memsizer_step_triton(p, a, vv, M, c)}
        for name, fn in cases.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(graph):
                fn()
            gus = bench(graph.replay) * 1e3
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            eus = (time.perf_counter() - t) / 200 * 1e6
            out.append((name, str(sdt)[6:], gus, eus))
            log(f"  {name:28s} {str(sdt)[6:]:9s} graph {gus:7.2f} us  eager {eus:7.2f} us")
    return out


# CONFIG variants on top of the defaults; "programs" with run_min_chunks=0 forces causal runs at every length
# (the check at T=1000 then covers the run path). The first call's list, results in kernels/NOTES.md.
VARIANTS = [{"programs": 0}, {"programs": 528, "run_min_chunks": 0, "run_bwd_warps": 8},
            {"programs": 528, "run_min_chunks": 0}, {"programs": 1056, "run_min_chunks": 0},
            {"programs": 264, "run_min_chunks": 0, "run_bwd_warps": 8},
            {"BT": 128, "fwd_warps": 8, "bwd_warps": 8, "run_bwd_warps": 8, "programs": 264, "run_min_chunks": 0},
            {"programs": 528, "run_min_chunks": 0, "stages": 3, "run_bwd_warps": 8},
            {"programs": 528, "run_min_chunks": 0, "maxnreg": 128, "run_bwd_warps": 8},
            {"BT": 32, "bwd_warps": 4, "programs": 528, "run_min_chunks": 0},
            {"programs": 528, "run_min_chunks": 0, "state": 8192, "run_bwd_warps": 8},
            {"programs": 528, "run_min_chunks": 0, "state": 2048, "run_bwd_warps": 8},
            {"programs": 2112, "run_min_chunks": 0}, {}]


def variant(var, Ts):
    """One CONFIG variant (run in its own process, so a crash costs only this variant): a quick correctness check
    against float64 (B=2, H=4, T=1000, padding, causal, grads; MemSizer too), then timings. Prints RESULT json."""
    import json
    chunk.CONFIG.update(var)
    err = {}
    g = torch.Generator(device=dev).manual_seed(11)
    xs = [torch.randn(2, 4, 1000, 64, device=dev, generator=g).bfloat16().requires_grad_() for _ in range(3)]
    dy = torch.randn(2, 4, 1000, 64, device=dev, generator=g).bfloat16()
    mask = torch.rand(2, 1000, device=dev, generator=g) < 0.1
    mask[0], mask[1, :3] = False, True
    with Poison():
        out = grads_of(lambda q, k, v: linear_attention_triton(q, k, v, key_padding_mask=mask), xs, dy)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    exp = grads_of(lambda q, k, v: linear_attention_ref(q, k, v, key_padding_mask=mask), x64, dy.double())
    err["linear"] = max(rel(a, b) for a, b in zip(out, exp))
    ms = [torch.randn(2, 1000, 32, device=dev, generator=g).softmax(-1), torch.randn(2, 1000, 32, device=dev, generator=g),
          torch.randn(2, 1000, 1024, device=dev, generator=g)]
    ms = [x.bfloat16().requires_grad_() for x in ms]
    mdy = torch.randn(2, 1000, 1024, device=dev, generator=g).bfloat16()
    with Poison():
        out = grads_of(lambda p, a, v: memsizer_triton(p, a, v, True, key_padding_mask=mask), ms, mdy)
    x64 = [x.detach().double().requires_grad_() for x in ms]
    exp = grads_of(lambda p, a, v: memsizer_ref(p, a, v, True, key_padding_mask=mask), x64, mdy.double())
    err["memsizer"] = max(rel(a, b) for a, b in zip(out, exp))
    res = {"var": var, "err": err}
    B, H, D = 8, 16, 64
    for T in Ts:
        x = [torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for _ in range(3)]
        dy = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
        ms_x = [torch.randn(B, T, 32, device=dev).softmax(-1).bfloat16().requires_grad_(),
                torch.randn(B, T, 32, device=dev).bfloat16().requires_grad_(),
                torch.randn(B, T, H * D, device=dev, dtype=torch.bfloat16).requires_grad_()]
        ms_dy = torch.randn(B, T, H * D, device=dev, dtype=torch.bfloat16)
        fn = lambda q, k, v: linear_attention_triton(q, k, v, causal=True)  # noqa: E731
        mfn = lambda p, a, v: memsizer_triton(p, a, v, True)  # noqa: E731
        with torch.no_grad():
            res[f"lin_f{T}"] = bench(lambda: fn(*x))
            res[f"ms_f{T}"] = bench(lambda: mfn(*ms_x))
        res[f"lin_fb{T}"] = bench(fwd_bwd(fn, x, dy))
        res[f"ms_fb{T}"] = bench(fwd_bwd(mfn, ms_x, ms_dy))
        del x, ms_x
        torch.cuda.empty_cache()
    print("RESULT " + json.dumps(res), flush=True)


def sweep(Ts, deadline):
    import json
    import subprocess
    res = []
    for var in VARIANTS:
        left = deadline - time.time()
        if left < 20:
            log(f"  sweep: out of time, skipping {var}")
            continue
        cmd = [sys.executable, __file__, "--variant", json.dumps(var), "--T", *map(str, Ts)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=min(left, 90))
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                log(f"  sweep {var}: failed rc={p.returncode}: {(p.stderr or p.stdout)[-600:]}")
                continue
            r = json.loads(line[0][7:])
        except subprocess.TimeoutExpired:
            log(f"  sweep {var}: timed out")
            continue
        res.append(r)
        log("  sweep " + json.dumps(r))
    return res


def ceilings():
    x = torch.empty(2 ** 28, device=dev, dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / ms / 1e6  # GB/s
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms2 = bench(lambda: a @ a)
    tf = 2 * 8192 ** 3 / ms2 / 1e9
    del x, y, a
    torch.cuda.empty_cache()
    log(f"  device-to-device copy {bw:.0f} GB/s (read+write); bf16 8192^3 matmul {tf:.0f} TFLOP/s")
    return bw, tf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--check-only", action="store_true", help="the correctness checks alone")
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--sweep-T", type=int, nargs="+", default=[1024, 16384])
    ap.add_argument("--variant", help="internal: run one CONFIG variant (json) and print its RESULT line")
    ap.add_argument("--budget-s", type=float, default=300, help="the sweep stops starting variants after this")
    a = ap.parse_args()
    if a.variant:
        import json
        return variant(json.loads(a.variant), a.T)
    t0 = time.time()
    log(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()} CONFIG {chunk.CONFIG}")
    bw, tf = ceilings()
    ok = True
    if not a.no_check:
        log("correctness (bf16 vs float64 on the GPU):")
        ok &= check_linear("causal B8 H16 T1000 mask", 8, 16, 1000, 1000, True, 0.1, linear_attention_ref)
        ok &= check_linear("causal B8 H16 T1000 mask runs", 8, 16, 1000, 1000, True, 0.1, linear_attention_ref,
                           programs=528)
        ok &= check_linear("cross B8 H16 T1000 S777 mask", 8, 16, 1000, 777, False, 0.1, linear_attention_ref)
        ok &= check_linear("causal B2 H4 T1000 d64 dv200 fp16", 2, 4, 1000, 1000, True, 0.1, linear_attention_ref,
                           dt=torch.float16, dv=200)
        for dt in (torch.float32, torch.float16):  # the serial passes in float32 / tf32 dots
            ok &= check_linear(f"causal B8 H16 T1000 mask {str(dt)[6:]}", 8, 16, 1000, 1000, True, 0.1,
                               linear_attention_ref, dt=dt)
        ok &= check_linear("causal B8 H16 T4096 mask, features mapped outside", 8, 16, 4096, 4096, True, 0.1,
                           linear_attention_ref, feature_map=None)
        ok &= check_linear("causal B8 H16 T16384 (chunked f64 ref)", 8, 16, 16384, 16384, True, 0.0,
                           linear_attention_chunked_torch)
        ok &= check_memsizer("memsizer causal B8 T1000 k32 d1024 mask", 8, 1000, 1000, 32, 1024, True, 0.1)
        ok &= check_memsizer("memsizer cross B8 T1000 S600 k32 d1024 mask", 8, 1000, 600, 32, 1024, False, 0.1)
        ok &= check_memsizer("memsizer causal B1 T16384 k32 d1024", 1, 16384, 16384, 32, 1024, True, 0.0)
        check_steps()
        log(f"  checks done at {time.time() - t0:.0f} s")
    if a.check_only:
        log("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
        sys.exit(0 if ok else 1)
    log("timings (bf16, B=8, H=16, D=64; MemSizer k=32, d=1024):")
    rows = time_ops(a.T)
    log(f"  done at {time.time() - t0:.0f} s")
    log("decode (batch 64, 8 heads of 64; MemSizer 32 slots x 512), CUDA graph replay:")
    dec = time_decode()
    sw = sweep(a.sweep_T, t0 + a.budget_s) if a.sweep else []
    # ---- the short table, last
    log("\n==== summary ====")
    log(f"ceilings: copy {bw:.0f} GB/s, bf16 matmul {tf:.0f} TFLOP/s; wall {time.time() - t0:.0f} s")
    for _, name, st, s in LINES:
        log(f"check {st:4s} {name}: {s}")
    by = {(n, T): (f, fb, m) for n, T, f, fb, m in rows}
    log(f"{'op':22s} {'T':>6s} {'fwd ms':>8s} {'f+b ms':>8s} {'peak MiB':>9s} {'x SDPA f+b':>10s} {'floor f+b':>9s}")
    for n, T, f, fb, m in rows:
        sd = by.get(("sdpa_flash", T), (1, 1, 1))[1]
        rows_b = 8 * 16 * T * 64 * 2  # bytes of one (B, H, T, D) bf16 tensor
        floor = (4 + 8) * rows_b / bw / 1e6 if n == "linear_triton" else float("nan")
        log(f"{n:22s} {T:6d} {f:8.3f} {fb:8.3f} {m:9.0f} {fb / sd:10.3f} {floor:9.3f}")
    for name, dt, gus, eus in dec:
        log(f"decode {name:28s} {dt:9s} graph {gus:6.2f} us eager {eus:6.2f} us")
    for r in sw:
        t = "  ".join(f"{k} {v:.3f}" for k, v in r.items() if k not in ("var", "err"))
        log(f"sweep {str(r['var']):62s} err lin {r['err']['linear']:.1e} ms {r['err']['memsizer']:.1e} | {t}")
    if not ok:
        log("SOME CHECKS FAILED")
        sys.exit(1)


if __name__ == "__main__":
    main()
