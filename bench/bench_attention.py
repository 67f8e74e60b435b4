"""Benchmark of the attention ops: time and peak memory against PyTorch SDPA, plus decode-step latency.

    PYTHONPATH=. python bench/bench_attention.py --out bench/out [--quick] [--T 512 1024] [--variants ...]
    PYTHONPATH=. python bench/bench_attention.py --device cpu --quick      # logic check without a GPU

For every variant and T: forward (under no_grad) and forward+backward time (median over CUDA-event-timed calls,
L2 flushed before each) and peak memory (max_memory_allocated after a reset, minus what was allocated before
the call: inputs, upstream gradient). Ratios are against the baseline measured in the same run at the same shape:
``sdpa`` (SDPA's default backend selection, the fastest it has: cuDNN on Hopper) when it is among the variants,
else ``sdpa_flash``.
Every measurement is in its own try/except: OOM and errors are recorded in the JSON, never fatal. See README.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import plot  # noqa: E402  bench/plot.py: the script's folder is on sys.path when run as `python bench/bench_attention.py`

ALL_VARIANTS = ["sdpa", "sdpa_flash", "linear_triton", "linear_torch", "linear_ref", "fla_chunk", "fla_chunk_raw",
                "memsizer_triton", "memsizer_torch", "memsizer_ref", "topk_triton", "topk_torch"]
# Cost grows as T**order: used to predict the next T's time from the last one and skip calls that would be too long.
ORDER = {"sdpa": 2, "sdpa_flash": 2, "linear_triton": 1, "linear_torch": 1, "linear_ref": 1, "fla_chunk": 1,
         "fla_chunk_raw": 1,
         "memsizer_triton": 1, "memsizer_torch": 1, "memsizer_ref": 1, "topk_triton": 2, "topk_torch": 2}


# ---------------------------------------------------------------------------------------------------------------
# Variants. make(a, B, H, T) -> (inputs, fn): fn(*inputs) is the timed op. ref(*inputs in float32) -> the reference
# output, used once at a small odd shape to check that what is timed computes the right thing.

def _sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _sdpa_default(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # whatever backend SDPA picks (cuDNN on Hopper)


def baseline_of(variants) -> str:
    """The variant every ratio is against: SDPA's default selection when measured, else its flash backend."""
    return "sdpa" if "sdpa" in variants else "sdpa_flash"


def _sdpa_ref(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # math backend in float32


def _qkv(a, B, H, T, layout="bhtd"):
    shape = (B, H, T, a.D) if layout == "bhtd" else (B, T, H, a.D)
    return [torch.randn(shape, device=a.device, dtype=a.dtype) for _ in range(3)]


def _tri(a):
    """Backend for the 'triton' variants: the reference on CPU unless Triton's interpreter is on."""
    return "triton" if a.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"


def make_variant(name, a):
    """Returns (make, ref) for a variant, importing what it needs (ImportError propagates: variant unavailable)."""
    if name == "sdpa_flash":
        return (lambda B, H, T: (_qkv(a, B, H, T), _sdpa)), _sdpa_ref
    if name == "sdpa":
        return (lambda B, H, T: (_qkv(a, B, H, T), _sdpa_default)), _sdpa_ref
    if name.startswith("linear_"):
        from attnlab.kernels.linear_attn import linear_attention
        from attnlab.kernels.linear_attn.reference import linear_attention_ref
        if name == "linear_ref":  # the definition: cumulative sums over a (B, H, T, D, D) tensor
            fn = lambda q, k, v: linear_attention_ref(q, k, v, causal=True)  # noqa: E731
        else:  # backend="torch" is the chunked PyTorch path
            be = _tri(a) if name == "linear_triton" else "torch"
            fn = lambda q, k, v: linear_attention(q, k, v, causal=True, backend=be)  # noqa: E731
        return (lambda B, H, T: (_qkv(a, B, H, T), fn)), (lambda q, k, v: linear_attention_ref(q, k, v, causal=True))
    if name == "fla_chunk":
        if a.device.type != "cuda":
            raise ImportError("fla needs CUDA (its kernels are Triton without a CPU path)")
        from fla.ops.linear_attn import chunk_linear_attn
        from attnlab.kernels.linear_attn.reference import elu1, linear_attention_ref

        def fn(q, k, v):  # (B, T, H, D) layout; the feature map is applied here as linear_attention does inside
            return chunk_linear_attn(elu1(q), elu1(k), v, normalize=True)[0]

        def ref(q, k, v):
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            return t(linear_attention_ref(t(q), t(k), t(v), causal=True))
        return (lambda B, H, T: (_qkv(a, B, H, T, layout="bthd"), fn)), ref
    if name == "fla_chunk_raw":  # fla's fastest form: features mapped before the timing, no normaliser, scale 1
        if a.device.type != "cuda":
            raise ImportError("fla needs CUDA (its kernels are Triton without a CPU path)")
        from fla.ops.linear_attn import chunk_linear_attn
        from attnlab.kernels.linear_attn.reference import causal_dot_chunked, elu1

        def mk(B, H, T):
            q, k, v = _qkv(a, B, H, T, layout="bthd")
            return [elu1(q), elu1(k), v], lambda q, k, v: chunk_linear_attn(q, k, v, scale=1.0, normalize=False)[0]

        def ref(q, k, v):  # sum_{j <= t} (q_t . k_j) v_j on the mapped features
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            return t(causal_dot_chunked(t(q), t(k), t(v)))
        return mk, ref
    if name.startswith("memsizer_"):
        from attnlab.kernels.memsizer import memsizer, memsizer_ref
        if name == "memsizer_ref":  # the definition: a prefix sum over a (B, T, k, d) tensor
            fn = lambda p, k, v: memsizer_ref(p, k, v, causal=True)  # noqa: E731
        else:  # backend="torch" is the chunked PyTorch path
            be = _tri(a) if name == "memsizer_triton" else "torch"
            fn = lambda p, k, v: memsizer(p, k, v, causal=True, backend=be)  # noqa: E731

        def mk(B, H, T):  # one head, a.slots slots, values as wide as all heads of the other variants: H * D
            p = torch.randn(B, T, a.slots, device=a.device).softmax(-1).to(a.dtype)
            k = torch.randn(B, T, a.slots, device=a.device).softmax(-1).to(a.dtype)
            v = torch.randn(B, T, H * a.D, device=a.device, dtype=a.dtype)
            return [p, k, v], fn
        return mk, (lambda p, k, v: memsizer_ref(p, k, v, causal=True))
    if name.startswith("topk_"):
        from attnlab.kernels.topk_attn import topk_attention
        be = _tri(a) if name == "topk_triton" else "torch"
        fn = lambda q, k, v: topk_attention(q, k, v, a.topk, True, backend=be)  # noqa: E731
        ref = lambda q, k, v: topk_attention(q, k, v, a.topk, True, backend="torch")  # noqa: E731
        return (lambda B, H, T: (_qkv(a, B, H, T), fn)), ref
    raise ValueError(f"unknown variant {name!r}; expected some of {ALL_VARIANTS}")


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory

class Timer:
    """Median time of a call: CUDA events around each call with L2 flushed before it, or perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        # 256 MiB written before each timed call so no input is still in L2 (50-60 MiB on H100/H200)
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if self.cuda else None

    def once(self, fn) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        self.flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e)

    def median(self, fn, first_ms, rep_ms, min_iters, max_iters) -> tuple[float, int]:
        """first_ms: an already-measured warm call, counted as a sample. Repeats until ~rep_ms of samples."""
        n = int(min(max_iters, max(min_iters, rep_ms / max(first_ms, 1e-3))))
        samples = [first_ms] + [self.once(fn) for _ in range(n - 1)]
        return statistics.median(samples), n


def cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(make, B, H, T, mode, timer, a):
    """One (shape, mode) measurement: returns (median ms, peak MiB above inputs or None, iterations)."""
    inputs, fn = make(B, H, T)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(*inputs)
    else:
        for x in inputs:
            x.requires_grad_(True)
        out = fn(*inputs)  # warm-up (compiles) and output shape
        dout = torch.randn_like(out)
        del out

        def call():
            for x in inputs:
                x.grad = None  # no gradient accumulation inside the timed call
            fn(*inputs).backward(dout)
    call()  # warm-up: Triton compilation and autotuning stay out of time and memory
    for x in inputs:
        x.grad = None
    cuda = a.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    first = timer.once(call)
    mem = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    if cuda and a.timing == "graph":
        call = graphed(call)
        first = timer.once(call)
    ms, n = timer.median(call, first, a.rep_ms, a.min_iters, a.max_iters)
    return ms, mem, n


def graphed(call, warm=1):
    """``call`` captured once in a CUDA graph; returns its replay. Times the GPU work alone, as a model trained
    with ``model.compile=reduce-overhead`` runs it: the host's launch overhead (Python, Triton's launcher, autograd)
    is gone. Input grads were set to None before the capture, so each replay writes them, never accumulates."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        for _ in range(warm):
            call()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    g.replay()
    torch.cuda.synchronize()
    return g.replay


def error_string(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return "OOM: " + str(e).split("\n")[0][:200]
    return f"{type(e).__name__}: {e}"[:500]


def check(make, ref, a) -> float:
    """Relative L2 error of the timed op against its float32 reference, at the sweep's B, H and first T (capped at
    1024): the shape the kernels are compiled and autotuned for anyway (fla autotunes per head count)."""
    torch.manual_seed(1)
    inputs, fn = make(a.B, a.H, a.check_T)
    with torch.no_grad():
        out = fn(*inputs).float()
        exp = ref(*[x.float() for x in inputs]).float()
    return ((out - exp).norm() / exp.norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# Decode step

def eager_us(step, iters):
    """Wall clock per step over back-to-back eager steps: host launch overhead included, as in a decode loop."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(max(1, iters // 5)):
            step()
        sync()
        times.append((time.perf_counter() - t) / max(1, iters // 5) * 1e6)
    return statistics.median(times)


def decode_bench(a, timer, log):
    """One decoding step at batch a.dB, a.dH heads of a.dD: linear attention and MemSizer (constant-size state,
    any context) vs SDPA reading a KV cache of each context length. Graph replay where capture works."""
    dev, dt, B, H, d = a.device, a.dtype, a.dB, a.dH, a.dD
    sdt = a.state_dtype  # linear attention / MemSizer step: inputs and state in one dtype (the state sums the context)
    cases = []  # (op, context, step fn)

    def la_case(be):  # be == "inplace": the allocation-free Triton step that updates S, z in place
        from attnlab.kernels.linear_attn import linear_attention_step
        q, k, v = (torch.randn(B, H, d, device=dev, dtype=sdt) for _ in range(3))
        S = torch.rand(B, H, d, d, device=dev, dtype=sdt)  # random, not zeros: realistic data, every byte read
        z = torch.rand(B, H, d, device=dev, dtype=sdt) + 1
        if be == "inplace":
            from attnlab.kernels.linear_attn.recurrent import linear_attention_step_
            out = torch.empty_like(v)
            return lambda: linear_attention_step_(q, k, v, S, z, out)
        return lambda: linear_attention_step(q, k, v, S, z, backend=be)

    def ms_case(be):  # one head, values as wide as the heads of the other ops together (H * d), as in the T sweep
        from attnlab.kernels.memsizer import memsizer_step
        p = torch.randn(B, a.slots, device=dev).softmax(-1).to(sdt)
        k = torch.randn(B, a.slots, device=dev).softmax(-1).to(sdt)
        v = torch.randn(B, H * d, device=dev, dtype=sdt)
        S = torch.rand(B, a.slots, H * d, device=dev, dtype=sdt)
        count = torch.full((B,), 100.0, device=dev, dtype=sdt)
        if be == "inplace":
            from attnlab.kernels.memsizer.recurrent import memsizer_step_
            out = torch.empty_like(v)
            return lambda: memsizer_step_(p, k, v, S, count, out)
        return lambda: memsizer_step(p, k, v, S, count, backend=be)

    def sdpa_case(ctx):
        q = torch.randn(B, H, 1, d, device=dev, dtype=dt)
        kn, vn = torch.randn(B, H, d, device=dev, dtype=dt), torch.randn(B, H, d, device=dev, dtype=dt)
        kc, vc = (torch.randn(B, H, ctx, d, device=dev, dtype=dt) for _ in range(2))

        def step():  # write the new key/value into the last cache slot, attend over the full cache
            kc[:, :, ctx - 1].copy_(kn)
            vc[:, :, ctx - 1].copy_(vn)
            if dev.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, kc, vc)
            return F.scaled_dot_product_attention(q, kc, vc)
        return step

    bes = ["inplace", "triton", "torch"] if _tri(a) == "triton" else ["torch"]
    builders = [(f"linear_step_{be}", None, (lambda be=be: la_case(be))) for be in bes]
    builders += [(f"memsizer_step_{be}", None, (lambda be=be: ms_case(be))) for be in bes]
    builders += [("sdpa_kv_cache", c, (lambda c=c: sdpa_case(c))) for c in a.contexts]
    for op, ctx, build in builders:
        row = {"op": op, "context": ctx}
        cases.append(row)
        try:
            step = build()
            for _ in range(3):
                step()
            row["eager_us"] = eager_us(step, a.decode_iters)
            if dev.type == "cuda":
                try:
                    replay = graphed(step, warm=3)
                    row["graph_us"] = timer.median(replay, timer.once(replay), 50, 20, a.decode_iters)[0] * 1e3
                    del replay
                except Exception as e:  # noqa: BLE001  (a step that cannot be captured keeps its eager time)
                    row["graph_error"] = error_string(e)
        except Exception as e:  # noqa: BLE001
            row["error"] = error_string(e)
        cleanup()
        log(f"decode {op:22s} ctx={ctx}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in row.items() if k not in ("op", "context")))
    return cases


# ---------------------------------------------------------------------------------------------------------------

def versions():
    out = {"torch": torch.__version__, "triton": None, "fla": None}
    for mod in ("triton", "fla"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/out", help="folder for results.json, results.md, time.png, memory.png")
    p.add_argument("--quick", action="store_true", help="a few T only (CPU: tiny shapes)")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 512 ... 65536)")
    p.add_argument("--variants", nargs="+", default=ALL_VARIANTS, choices=ALL_VARIANTS, metavar="NAME",
                   help="some of: " + " ".join(ALL_VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) | float16 | float32 (default on CPU)")
    p.add_argument("--B", type=int, default=None, help="batch (default 8; CPU quick: 2)")
    p.add_argument("--H", type=int, default=None, help="heads (default 16; CPU quick: 2)")
    p.add_argument("--D", type=int, default=None, help="head dim (default 64; CPU quick: 16)")
    p.add_argument("--fallback-B", type=int, default=1, help="batch retried when a variant does not fit at --B")
    p.add_argument("--fallback-H", type=int, default=12, help="heads retried when a variant does not fit at --H")
    p.add_argument("--slots", type=int, default=32, help="MemSizer memory slots k")
    p.add_argument("--topk", type=int, default=64, help="keys kept per query by top-k attention")
    p.add_argument("--timing", choices=["eager", "graph"], default="eager",
                   help="eager: each call launched from Python (host overhead included, as an eager training step "
                        "pays it); graph: replayed from a CUDA graph (GPU time only, as under reduce-overhead)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="time spent on samples per measurement")
    p.add_argument("--min-iters", type=int, default=3)
    p.add_argument("--max-iters", type=int, default=50)
    p.add_argument("--max-call-s", type=float, default=5.0,
                   help="skip a measurement whose one call is predicted (from the last T) to take longer")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget: measurements left when it runs out are skipped (recorded as such)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode-step benchmark")
    p.add_argument("--contexts", type=int, nargs="+", default=[784, 3072, 16384], help="KV-cache lengths for SDPA decode")
    p.add_argument("--decode-iters", type=int, default=200)
    p.add_argument("--state-dtype", default="float32", help="dtype of the linear-attention/MemSizer decode step")
    p.add_argument("--no-check", action="store_true", help="skip the small correctness check of each variant")
    p.add_argument("--commit", default=None, help="git commit to record (the device copy may have no .git)")
    a = p.parse_args(argv)
    a.device = torch.device(a.device)
    cpu = a.device.type == "cpu"
    a.dtype = getattr(torch, a.dtype or ("float32" if cpu else "bfloat16"))
    a.state_dtype = getattr(torch, a.state_dtype)
    tiny = cpu and a.quick
    a.B, a.H, a.D = a.B or (2 if tiny else 8), a.H or (2 if tiny else 16), a.D or (16 if tiny else 64)
    if a.T is None:
        a.T = ([64, 128] if cpu else [512, 2048, 8192]) if a.quick else [2 ** i for i in range(9, 17)]
    a.check_T = min(a.T[0], 1024)
    a.dB, a.dH, a.dD = (2, 2, 16) if tiny else (64, 8, 64)
    if tiny:
        a.contexts, a.topk, a.slots, a.decode_iters = [32, 64], 8, 8, 20
    return a


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    os.makedirs(a.out, exist_ok=True)
    dev = a.device
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", **versions(),
           "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": a.commit or git_commit(), "argv": sys.argv[1:],
           "config": {"variants": a.variants, "T": a.T, "B": a.B, "H": a.H, "D": a.D,
                      "dtype": str(a.dtype).split(".")[1], "timing": a.timing,
                      "fallback": [a.fallback_B, a.fallback_H], "slots": a.slots, "topk": a.topk, "check_T": a.check_T,
                      "decode": {"B": a.dB, "H": a.dH, "D": a.dD, "contexts": a.contexts,
                                 "state_dtype": str(a.state_dtype).split(".")[1]}},
           "unavailable": {}, "checks": {}, "rows": [], "decode": []}
    json_path = os.path.join(a.out, "results.json")

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    def save():
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)

    timer = Timer(dev)
    if not a.no_decode:
        res["decode"] = decode_bench(a, timer, log)
        save()

    variants = {}
    for name in a.variants:
        try:
            variants[name] = make_variant(name, a)
        except Exception as e:  # noqa: BLE001  (ImportError for a kernel not written / fla not installed)
            res["unavailable"][name] = error_string(e)
            log(f"{name}: unavailable, skipped ({res['unavailable'][name]})")
            continue
        if not a.no_check:
            try:
                res["checks"][name] = check(*variants[name], a)
                log(f"{name}: rel. error vs float32 reference at B={a.B},H={a.H},T={a.check_T}: "
                    f"{res['checks'][name]:.2e}")
            except Exception as e:  # noqa: BLE001
                res["checks"][name] = error_string(e)
                log(f"{name}: check failed: {res['checks'][name]}")
            cleanup()

    last = {}  # (variant, mode) -> (work, ms) of the last successful measurement, to predict the next
    sdpa = {}  # (T, B, H) -> row of the baseline
    base_name = baseline_of(a.variants)
    res["baseline"] = base_name

    def run(name, T, B, H):
        row = {"variant": name, "T": T, "B": B, "H": H}
        make = variants[name][0]
        for mode in ("fwd", "fwdbwd"):
            work = B * H * T ** ORDER[name]
            if mode == "fwdbwd" and "fwd_ms" not in row and row["fwd_error"].startswith(("OOM", "skipped")):
                row["fwdbwd_error"] = row["fwd_error"] + " (in fwd)"
                continue
            if time.time() - t_start > a.budget_s:
                row[mode + "_error"] = f"skipped: time budget --budget-s {a.budget_s:.0f} spent"
                continue
            if (name, mode) in last and name != base_name:  # the baseline is never skipped
                w0, ms0 = last[(name, mode)]
                pred = ms0 * work / w0 / 1e3
                if pred > a.max_call_s:
                    row[mode + "_error"] = f"skipped: predicted {pred:.2g} s per call > --max-call-s {a.max_call_s}"
                    continue
            try:
                ms, mem, n = measure(make, B, H, T, mode, timer, a)
                row[mode + "_ms"], row[mode + "_mem_mib"], row[mode + "_iters"] = ms, mem, n
                last[(name, mode)] = (work, ms)
            except Exception as e:  # noqa: BLE001
                row[mode + "_error"] = error_string(e)
            cleanup()
        if name == base_name:
            sdpa[(T, B, H)] = row
        base = sdpa.get((T, B, H), {})
        for mode in ("fwd", "fwdbwd"):
            if row.get(mode + "_ms") and base.get(mode + "_ms"):
                row[mode + "_x_sdpa"] = row[mode + "_ms"] / base[mode + "_ms"]
            if row.get(mode + "_mem_mib") and base.get(mode + "_mem_mib"):
                row[mode + "_mem_x_sdpa"] = row[mode + "_mem_mib"] / base[mode + "_mem_mib"]
        res["rows"].append(row)
        save()
        log(f"T={T:6d} B={B} H={H:2d} {name:16s} " + "  ".join(
            f"{m}: {row[m + '_ms']:.3f} ms {row[m + '_mem_mib'] or 0:.0f} MiB x{row.get(m + '_x_sdpa', 0):.2f}"
            if m + "_ms" in row
            else f"{m}: {row.get(m + '_error', '')[:60]}" for m in ("fwd", "fwdbwd")))
        return row

    fb = (a.fallback_B, a.fallback_H)
    for T in a.T:
        for name in sorted(variants, key=lambda n: n != base_name):  # the baseline first: the others' ratios need it
            row = run(name, T, a.B, a.H)
            oom = any(row.get(m + "_error", "").startswith("OOM") for m in ("fwd", "fwdbwd"))
            if oom and fb != (a.B, a.H):  # did not fit: measure at the smaller shape, with SDPA there for the ratio
                if name != base_name and (T, *fb) not in sdpa and base_name in variants:
                    run(base_name, T, *fb)
                run(name, T, *fb)

    res["wall_s"] = round(time.time() - t_start, 1)
    save()
    md = plot.markdown(res)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    try:
        plot.plot(res, a.out)
    except Exception as e:  # noqa: BLE001  (no matplotlib: the JSON and table are still there)
        log(f"plots not written: {error_string(e)}")
    log(f"wrote {a.out}/results.json, results.md, time.png, memory.png")
    print(md, flush=True)
    return res


if __name__ == "__main__":
    main()
