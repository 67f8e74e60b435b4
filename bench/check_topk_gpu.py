"""GPU check of the fused top-k attention kernels: correctness against float64 references (medium shapes and the
full benchmark size), then forward and forward+backward time and peak memory against PyTorch SDPA (its default
backend, and flash).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/check_topk_gpu.py --out $OUT

    # logic check without a GPU (Triton's interpreter, tiny shapes; the numbers mean nothing):
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/check_topk_gpu.py --dry-run

    # the whole check in one lease: each part in its own process (a CUDA error ends only that part): the threshold
    # kernels, their forward with the sparse backward, then the sparse kernels, falling back to their portable path
    # ({"fast": false}) if the default one fails
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/check_topk_gpu.py --plan --out $OUT --budget-s 400  # ~6.5 min

Sections run in order while the time budget lasts (--budget-s); a failing section prints its traceback and the
rest still run. The last lines are a summary table; full numbers go to OUT/topk_gpu.json.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import traceback

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"


def plan():
    """Run the parts as child processes within --budget-s; print their key lines and a combined summary."""
    import re
    import subprocess
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "bench/out"
    budget = float(sys.argv[sys.argv.index("--budget-s") + 1]) if "--budget-s" in sys.argv else 340
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    logf = open(os.path.join(out, "children.log"), "w")
    keep = re.compile(r"^(torch |check |full |time |sweep |\[|correctness|total|\s+T \||\s+\d+ \||.*Error)")

    def child(name, args, limit, config):
        left = budget - (time.time() - t0)
        limit = min(limit, left - 5)
        if limit < 20:
            print(f"== {name}: skipped, {left:.0f} s left", flush=True)
            return None
        cmd = [sys.executable, os.path.abspath(__file__), "--out", out, "--name", name, "--budget-s",
               str(limit - 15), "--config", json.dumps(config), *args]
        if "--dry-run" in sys.argv:
            cmd.append("--dry-run")
        print(f"== {name}: {' '.join(args)} config={config} (limit {limit:.0f} s)", flush=True)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            text, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        logf.write(f"==== {name} rc={rc}\n{text}\n")
        logf.flush()
        shown = [ln for ln in text.splitlines() if keep.match(ln)]
        print("\n".join(shown[:60]), flush=True)
        print(f"== {name}: rc={rc} after {time.time() - t0:.0f} s", flush=True)
        try:
            with open(os.path.join(out, f"{name}.json")) as f:
                return json.load(f)["results"]
        except Exception:
            return None

    def ok(res):
        checks = (res or {}).get("correct", []) + (res or {}).get("full", [])
        return bool(checks) and all(c["passed"] for c in checks) and bool((res or {}).get("timing"))

    child("T", ["--skip", "extra"], 120, {})  # the threshold kernels (the default path up to T = 32768)
    # their forward with the sparse backward (the default from 16384 rows), checked at every T
    child("TS", ["--path", "threshold-sparse", "--skip", "timing", "stats"], 120, {})
    base = {}
    sp = ["--path", "sparse"]  # the rest: the sparse kernels
    res = child("A", [*sp, "--skip", "extra"], 120, base)
    if not ok(res):
        base = {"fast": False}
        child("A_portable", [*sp, "--skip", "extra"], 120, base)
    child("C", [*sp, "--skip", "correct", "full", "timing"], 150, base)
    child("B", [*sp, "--skip", "correct", "full", "timing", "extra", "--sweep-T", "16384", "--sweep",
                json.dumps([{"stop": 1}, {"stop": 2}, {"stop": 3}])], 50, base)
    child("D", [*sp, "--skip", "correct", "full", "timing", "extra", "--sweep-T", "16384", "--sweep",
                json.dumps([{"BS": 8}, {"fwd_warps": 8}, {"progs_per_sm": 1}])], 200, base)
    print(f"plan done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__" and "--plan" in sys.argv:
    plan()
    sys.exit(0)

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import attnlab.kernels.topk_attn.chunk as chunk  # noqa: E402
import attnlab.kernels.topk_attn.threshold as threshold  # noqa: E402
import attnlab.kernels.topk_attn.function as function  # noqa: E402
from attnlab.kernels.topk_attn.function import topk_attention_triton  # noqa: E402
from attnlab.kernels.topk_attn.reference import (attention_over, threshold_keep,  # noqa: E402
                                                 topk_attention_chunked, topk_attention_dense)

T0 = time.time()
DEV = "cpu" if "--dry-run" in sys.argv else "cuda"
RESULTS = {"correct": [], "full": [], "timing": [], "sweep": []}
LINES = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LINES.append(s)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


class Poison:
    """NaN / -7 in every buffer allocated inside the block, so an unwritten element shows up."""

    def __enter__(self):
        self.e, self.el = torch.empty, torch.empty_like

        def fill(t):
            return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)
        torch.empty = lambda *a, **k: fill(self.e(*a, **k))
        torch.empty_like = lambda *a, **k: fill(self.el(*a, **k))

    def __exit__(self, *exc):
        torch.empty, torch.empty_like = self.e, self.el


def make(B, H, T, S, d, dtype, pad, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, H, T, d, device=DEV, generator=g).to(dtype)
    k = torch.randn(B, H, S, d, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, H, S, d, device=DEV, generator=g).to(dtype)
    kpm = None
    if pad:
        kpm = torch.rand(B, S, device=DEV, generator=g) < 0.2
        kpm[0] = False
    return q, k, v, kpm


TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def check_case(B, H, T, S, d, dtype, topk, causal, pad, seed=0):
    q, k, v, kpm = make(B, H, T, S, d, dtype, pad, seed)
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    with Poison():
        out = topk_attention_triton(qt, kt, vt, topk, causal, key_padding_mask=kpm)
        dout = torch.randn_like(out.float()).to(dtype)
        out.backward(dout)
    sync()
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = topk_attention_dense(qr, kr, vr, topk, causal, kpm)
    ref.backward(dout.double())
    errs = {n: rel(a, b) for n, a, b in (("out", out, ref), ("dq", qt.grad, qr.grad), ("dk", kt.grad, kr.grad),
                                          ("dv", vt.grad, vr.grad))}
    nan = any(t.isnan().any().item() for t in (out, qt.grad, kt.grad, vt.grad))
    # selection agreement: the kernel's index sets against the float64 top-k (flips only at near-ties)
    s = (qr.detach() @ kr.detach().transpose(-1, -2))
    ok = torch.ones(T, S, dtype=torch.bool, device=DEV)
    if causal:
        ok = ok.tril(S - T)
    ok = ok[None, None] if kpm is None else ok[None, None] & ~kpm[:, None, None, :]
    s = s.masked_fill(~ok, float("-inf"))
    refI = s.topk(min(topk, S), -1).indices
    args = (q.contiguous(), k.contiguous(), v.contiguous(), min(topk, S), causal, kpm, d ** -0.5)
    if function.takes_threshold(T, d, d):  # the threshold path: its (t, tj) against the float64 scores
        _, _, t, tj, _ = threshold.threshold_fwd(*args)
        mine = threshold_keep(s, t, tj) & ok
    else:
        _, P, I = chunk.topk_fwd(*args)
        # empty slots (-1) go to an extra column S, so they cannot overwrite a real selection
        mine = torch.zeros(*s.shape[:-1], S + 1, dtype=torch.bool, device=DEV)
        mine = mine.scatter_(-1, torch.where(I >= 0, I.long(), S), True)[..., :S]
    theirs = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, refI, True) & ok
    rows_differ = (mine != theirs).any(-1).float().mean().item()
    passed = (not nan) and all(e < TOL[dtype] for e in errs.values())
    rec = dict(B=B, H=H, T=T, S=S, d=d, dtype=str(dtype), topk=topk, causal=causal, pad=pad, errs=errs, nan=nan,
               rows_with_other_selection=rows_differ, passed=passed)
    RESULTS["correct"].append(rec)
    log(f"check {dtype} T={T} S={S} k={topk} causal={causal} pad={pad}: " +
        " ".join(f"{n}={e:.2e}" for n, e in errs.items()) + f" nan={nan} sel_diff_rows={rows_differ:.1e} "
        f"{'PASS' if passed else 'FAIL'}")
    return passed


def tie_case(dtype, topk=64, T=500, S=1000, d=64):
    """Duplicated keys tie at the k-th score in many rows (the key-index split, sweep T): the kernel's selection
    must hold exactly min(k, visible) keys, none below an unselected one, and out / grads must be those of that
    selection (float64 reference over the same keys)."""
    q, k, v, _ = make(1, 2, T, S, d, dtype, False, 4)
    k[:, :, S * 3 // 10:S * 4 // 10] = k[:, :, S // 10:S // 10 + 1]  # keys with the same score in every row
    q[:, :, T // 10:T // 5] = 0  # every score ties
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    _, _, t, tj, _ = threshold.threshold_fwd(q, k, v, topk, False, None, d ** -0.5)  # the selection, read back
    out = topk_attention_triton(qt, kt, vt, topk, False)
    dout = torch.randn_like(out)
    out.backward(dout)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = qr @ kr.transpose(-1, -2)
    keep = threshold_keep(s, t, tj)
    bad_rows = int((keep.sum(-1) != topk).sum())
    count_ok = bad_rows == 0
    order_ok = bool((s.masked_fill(~keep, float("inf")).amin(-1) >= s.masked_fill(keep, float("-inf")).amax(-1)
                     - 1e-6).all())
    ref = attention_over(s * d ** -0.5, keep, vr)
    ref.backward(dout.double())
    errs = {n: rel(a, b) for n, a, b in (("out", out, ref), ("dq", qt.grad, qr.grad), ("dk", kt.grad, kr.grad),
                                          ("dv", vt.grad, vr.grad))}
    passed = count_ok and order_ok and all(e < TOL[dtype] for e in errs.values())
    RESULTS["correct"].append(dict(case="ties", dtype=str(dtype), tie_rows=int((tj > 0).sum()), errs=errs,
                                   count_ok=count_ok, order_ok=order_ok, passed=passed))
    log(f"check ties {dtype}: tie rows {int((tj > 0).sum())}/{tj.numel()} rows with another count {bad_rows} "
        f"order_ok={order_ok} " + " ".join(f"{n}={e:.2e}" for n, e in errs.items())
        + f" {'PASS' if passed else 'FAIL'}")


def full_size(B, H, T, d, topk, heads=((0, 0), (-1, -1))):
    """Whole benchmark problem through the kernel; outputs and gradients of a few heads against the float64
    chunked reference on those heads (heads are independent)."""
    q, k, v, _ = make(B, H, T, T, d, torch.bfloat16, False, 1)
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    with Poison():
        out = topk_attention_triton(qt, kt, vt, topk, True)
        dout = torch.randn_like(out)
        out.backward(dout)
    sync()
    for b, h in heads:
        sl = (slice(b, b + 1 if b != -1 else None), slice(h, h + 1 if h != -1 else None))
        qr, kr, vr = (t[sl].detach().double().requires_grad_() for t in (q, k, v))
        ref = topk_attention_chunked(qr, kr, vr, topk, True, chunk_size=1024)
        ref.backward(dout[sl].double())
        errs = {n: rel(a[sl], r) for n, a, r in (("out", out, ref), ("dq", qt.grad, qr.grad),
                                                  ("dk", kt.grad, kr.grad), ("dv", vt.grad, vr.grad))}
        nan = any(t.isnan().any().item() for t in (out, qt.grad, kt.grad, vt.grad))
        passed = (not nan) and all(e < TOL[torch.bfloat16] for e in errs.values())
        RESULTS["full"].append(dict(B=B, H=H, T=T, d=d, topk=topk, head=(b, h), errs=errs, nan=nan, passed=passed))
        log(f"full B={B} H={H} T={T} head={b},{h}: " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()) +
            f" nan={nan} {'PASS' if passed else 'FAIL'}")
        del qr, kr, vr, ref


def sel_stats(B, H, T, d, topk):
    """How the selection went on the benchmark problem: bisection steps, R sweeps and T sweeps per tile."""
    q, k, v, _ = make(B, H, T, T, d, torch.bfloat16, False, 3)
    st = threshold.selection_stats(q, k, v, topk, True, None, d ** -0.5).double()
    steps, sweeps, ties = st.unbind(-1)
    rec = dict(T=T, steps_mean=steps.mean().item(), steps_max=steps.max().item(), sweeps_mean=sweeps.mean().item(),
               sweeps_max=sweeps.max().item(), multi_sweep_tiles=(sweeps > 1).double().mean().item(),
               tie_tiles=(ties > 0).double().mean().item())
    RESULTS.setdefault("stats", []).append(rec)
    log("stats " + " ".join(f"{n}={v:.3g}" for n, v in rec.items()))


def score_bits(B, H, T, d, configs):
    """A raw score's bits must not depend on the tile shape (the kernels recompute scores and compare them with
    t): the row max of sweep A (stop 1 stores it in t) under other key tiles, row tiles and warps, bit for bit."""
    base = dict(threshold.CONFIG)
    q, k, v, _ = make(B, H, T, T, d, torch.bfloat16, False, 5)
    ref = None
    for cfg in [{}, *configs]:
        threshold.CONFIG.update({**base, **cfg, "stop": 1})
        mx = threshold.threshold_fwd(q, k, v, 64, True, None, d ** -0.5)[2].clone()
        ref = mx if ref is None else ref
        same = bool(torch.equal(mx.view(torch.int32), ref.view(torch.int32)))
        RESULTS["correct"].append(dict(case="score bits", cfg=cfg, passed=same))
        log(f"check score bits {cfg}: {'PASS' if same else 'FAIL'} (rows differing: {int((mx != ref).sum())})")
    threshold.CONFIG.clear()
    threshold.CONFIG.update(base)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, grad_to_none, rep):
    if DEV == "cpu":  # dry run: once, wall clock
        t = time.time()
        fn()
        return (time.time() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=max(10, rep // 4), rep=rep, grad_to_none=grad_to_none,
                                   return_mode="median")


def synced(timer, fn, grad_to_none, rep):
    """fn timed as bench_attention.py's op tables time a call (its Timer: alone, L2 flushed before it, synchronized
    after it; the median). Beside do_bench in one process it reads top-k's fwd+bwd 4-8% longer and cuDNN's 0-4%, so
    its ratio is up to 8% higher (bench/RESULTS.md, session 18)."""
    def call():
        for x in grad_to_none:
            x.grad = None
        fn()
    first = timer.once(call)
    return timer.median(call, first, rep, 3, 50)[0]


def peak_mb(fn):
    if DEV == "cpu":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def timing(B, H, T, d, topk, rep, variants=("sdpa", "sdpa_flash", "topk_triton")):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench_attention import Timer  # bench/ is on sys.path when run as `python bench/check_topk_gpu.py`
    timer = Timer(torch.device(DEV))  # one flush buffer for the synced timings of every variant
    q, k, v, _ = make(B, H, T, T, d, torch.bfloat16, False, 2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    row = dict(B=B, H=H, T=T, d=d, topk=topk)
    for name in variants:
        if name == "sdpa":  # the default backend selection (cuDNN on Hopper)
            def f():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif name == "sdpa_flash":
            def f():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION if DEV == "cuda" else SDPBackend.MATH):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            def f():
                return topk_attention_triton(q, k, v, topk, True)

        def fb():
            f().backward(dout)
        with torch.no_grad():
            t_f = bench(f, None, rep)
        t_fb = bench(fb, [q, k, v], rep)
        t_sync = synced(timer, fb, [q, k, v], rep)
        with torch.no_grad():
            m_f = peak_mb(f)
        m_fb = peak_mb(fb)
        q.grad = k.grad = v.grad = None
        row[name] = dict(fwd_ms=t_f, fwdbwd_ms=t_fb, fwdbwd_synced_ms=t_sync, fwd_peak_mb=m_f, fwdbwd_peak_mb=m_fb)
        log(f"time T={T} {name}: fwd {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms (each call synchronized: {t_sync:.3f})  "
            f"peak fwd {m_f:.0f} MB  fwd+bwd {m_fb:.0f} MB")
    RESULTS["timing"].append(row)
    return row


def sweep(B, H, T, d, topk, rep, configs):
    """Time fwd and fwd+bwd of the top-k kernel under other CONFIG values (each one recompiles): threshold.CONFIG
    on the threshold path, chunk.CONFIG on the sparse one."""
    cfgd = threshold.CONFIG if function.takes_threshold(T, d, d) else chunk.CONFIG
    base = dict(cfgd)
    q, k, v, _ = make(B, H, T, T, d, torch.bfloat16, False, 3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    for cfg in configs:
        if time.time() - T0 > ARGS.budget_s:
            log("sweep: out of time budget")
            break
        cfgd.clear()
        cfgd.update({**base, **cfg})
        try:
            def f():
                return topk_attention_triton(q, k, v, topk, True)

            def fb():
                f().backward(dout)
            with torch.no_grad():
                t_f = bench(f, None, rep)
            # 'stop' configs skip work (timing breakdown): their outputs are garbage, so no backward
            t_fb = bench(fb, [q, k, v], rep) if not cfg.get("stop") else float("nan")
            RESULTS["sweep"].append(dict(T=T, cfg=cfg, fwd_ms=t_f, fwdbwd_ms=t_fb))
            log(f"sweep T={T} {cfg}: fwd {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms")
            if not cfg.get("stop"):  # the same kernels (T = 1024 specializes like T) against the reference
                check_case(2, 4, 1024, 1024, d, torch.bfloat16, topk, True, False)
        except Exception as e:  # a config that does not compile (shared memory, registers) is skipped
            log(f"sweep T={T} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
    cfgd.clear()
    cfgd.update(base)


def section(name, fn):
    if time.time() - T0 > ARGS.budget_s:
        log(f"[{name}] skipped: out of time budget ({time.time() - T0:.0f} s)")
        return
    t = time.time()
    try:
        fn()
    except Exception:
        log(f"[{name}] FAILED:\n{traceback.format_exc()}")
    log(f"[{name}] {time.time() - t:.1f} s (total {time.time() - T0:.0f} s)")


def kernel_smem():
    """The most shared memory any compiled variant of each threshold kernel asks for, read from the JIT's caches
    (function.THRESHOLD_SMEM must cover it: the kernels' tiles are not fitted to the device)."""
    out = {}
    for name in ("_select_kernel", "_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_delta_kernel"):
        for cache in getattr(getattr(threshold, name), "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for kernel in kernels.values():
                out[name] = max(out.get(name, 0), kernel.metadata.shared)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    p.add_argument("--budget-s", type=float, default=300)
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--config", type=json.loads, default={}, help='CONFIG overrides, e.g. \'{"BM": 32}\'')
    p.add_argument("--path", choices=["threshold", "threshold-sparse", "sparse"], default="threshold",
                   help="threshold kernels (threshold.py; their backward as CONFIG['sparse_bwd_T'] picks), the "
                        "threshold forward with the sparse backward, or the sparse P/I kernels (chunk.py), for every T")
    p.add_argument("--sweep", type=json.loads, default=[], help="list of CONFIG overrides to time at --sweep-T")
    p.add_argument("--sweep-T", type=int, default=8192)
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip: correct full timing extra stats sweep")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    p.add_argument("--name", default="topk_gpu", help="results go to OUT/NAME.json")
    global ARGS
    ARGS = p.parse_args()
    os.makedirs(ARGS.out, exist_ok=True)
    function.THRESHOLD_MAX_T = 0 if ARGS.path == "sparse" else 1 << 62
    if ARGS.path == "threshold-sparse":  # else the default: the sparse backward from CONFIG["sparse_bwd_T"] rows
        threshold.CONFIG["sparse_bwd_T"] = 0
    ARGS.kernels = "sparse" if ARGS.path == "sparse" else "threshold"  # whose CONFIG --config and --sweep set
    (threshold.CONFIG if ARGS.kernels == "threshold" else chunk.CONFIG).update(ARGS.config)
    try:
        topk_sig = str(inspect.signature(tl.topk.fn)) if hasattr(tl, "topk") else None
    except Exception as e:
        topk_sig = repr(e)
    name = torch.cuda.get_device_properties(0).name if DEV == "cuda" else "cpu (dry run)"
    log(f"torch {torch.__version__} triton {triton.__version__} {name} tl.topk={topk_sig} path={ARGS.path} "
        f"CONFIG={threshold.CONFIG if ARGS.kernels == 'threshold' else chunk.CONFIG}")
    B, H, D, K = ARGS.B, ARGS.H, ARGS.D, ARGS.topk
    if ARGS.dry_run:
        chunk.CONFIG.update(BM=16, BN=16, CAP=32, BS=16, KC=4, BMB=16)
        threshold.CONFIG.update(BM=16, BM_sel=16, BN=16)
        B, H, D, K, ARGS.T, ARGS.sweep_T = 1, 1, 16, 8, [40], 40
        global check_case
        real = check_case
        check_case = lambda B_, H_, T, S, d, dtype, topk, causal, pad: real(1, 1, min(T, 21), min(S, 37), 16, dtype,
                                                                            min(topk, 8), causal, pad)
    ties = dict(topk=4, T=20, S=40, d=16) if ARGS.dry_run else {}
    if "correct" not in ARGS.skip:  # T = 1024: the specialization that the timings use
        section("correct-main", lambda: [check_case(2, 4, 1024, 1024, D, torch.bfloat16, K, True, False),
                                         tie_case(torch.bfloat16, **ties)])
    if "full" not in ARGS.skip:
        section("full", lambda: full_size(B, H, max(ARGS.T), D, K))
    if "timing" not in ARGS.skip:
        for T in ARGS.T:
            section(f"timing-{T}", lambda T=T: timing(B, H, T, D, K, ARGS.rep_ms))
    if "extra" not in ARGS.skip:
        section("correct-extra", lambda: [
            check_case(2, 4, 1000, 1000, D, torch.bfloat16, K, True, False),
            check_case(1, 2, 1, 1000, D, torch.bfloat16, K, True, False),
            check_case(2, 4, 1000, 1000, D, torch.bfloat16, K, False, True),
            check_case(2, 2, 1000, 1000, D, torch.float16, K, True, True),
            check_case(2, 2, 1000, 1000, D, torch.float32, K, True, False),
            check_case(2, 2, 333, 1000, D, torch.bfloat16, 5, False, True),
            check_case(2, 2, 1000, 1000, D, torch.bfloat16, 128, True, False),
            tie_case(torch.bfloat16, **ties), tie_case(torch.float32, **ties),
        ])
    if "stats" not in ARGS.skip and ARGS.kernels == "threshold":
        section("stats", lambda: [sel_stats(B, H, T, D, K) for T in ARGS.T] + [score_bits(
            B, 2, min(ARGS.T), D, [{"BN": 64}, {"BN": 32}, {"BM_sel": 128}, {"sel_warps": 4}, {"BM_sel": 128,
                                                                                              "BN": 64}])])
    if ARGS.sweep and "sweep" not in ARGS.skip:
        section("sweep", lambda: sweep(B, H, ARGS.sweep_T, D, K, ARGS.rep_ms, ARGS.sweep))

    if ARGS.kernels == "threshold" and not ARGS.dry_run:
        RESULTS["smem"] = kernel_smem()
        log(f"shared memory per block (bytes, the JIT's compiled variants): {RESULTS['smem']}; guard "
            f"function.THRESHOLD_SMEM = {function.THRESHOLD_SMEM}"
            + (" EXCEEDED" if max(RESULTS["smem"].values(), default=0) > function.THRESHOLD_SMEM else ""))
    with open(os.path.join(ARGS.out, f"{ARGS.name}.json"), "w") as f:
        json.dump(dict(path=ARGS.path, config=threshold.CONFIG if ARGS.kernels == "threshold" else chunk.CONFIG,
                       results=RESULTS, log=LINES), f, indent=1, default=str)
    log("\n== summary ==")
    n_ok = sum(r["passed"] for r in RESULTS["correct"] + RESULTS["full"])
    log(f"correctness: {n_ok}/{len(RESULTS['correct']) + len(RESULTS['full'])} passed")
    log(f"{'T':>6} | {'sdpa fwd':>9} {'fwd+bwd':>8} {'peak MB':>8} | {'topk fwd':>9} {'fwd+bwd':>8} {'peak MB':>8} | "
        f"{'ratio':>5} {'synced':>6} | {'flash fwd+bwd':>13}")
    for r in RESULTS["timing"]:
        a, b, c = r.get("sdpa"), r.get("topk_triton"), r.get("sdpa_flash", {})
        if a and b:
            log(f"{r['T']:>6} | {a['fwd_ms']:>9.3f} {a['fwdbwd_ms']:>8.3f} {a['fwdbwd_peak_mb']:>8.0f} | "
                f"{b['fwd_ms']:>9.3f} {b['fwdbwd_ms']:>8.3f} {b['fwdbwd_peak_mb']:>8.0f} | "
                f"{b['fwdbwd_ms'] / a['fwdbwd_ms']:>5.2f} {b['fwdbwd_synced_ms'] / a['fwdbwd_synced_ms']:>6.2f} | "
                f"{c.get('fwdbwd_ms', float('nan')):>13.3f}")
    log(f"total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
