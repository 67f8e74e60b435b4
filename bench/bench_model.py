"""Whole-model benchmark: what a user of attnlab runs, in the dtypes the trainer uses (issue #11).

    python3 bench/bench_model.py --out DIR [--label after] [--variants ...] [--T ...] [--compile]

1. Training tokens/s and peak memory: attnlab's TransformerDecoder (8 layers, d=512, 8 heads, FFN 2048, vocab 256),
   B*T = 16384 tokens per step (from T = 32768 one sequence, T tokens), forward + backward + AdamW under
   torch.autocast(bfloat16) (what `trainer=gpu` runs), at T = 1024, 4096, 8192, 16384 (default; any T, e.g. 32768),
   for softmax (SDPA, default backend selection: the backend it picked is read off the profiler and reported),
   linear, memsizer (k=32) and topk (k=64). Tokens/s: median of timed steps
   after warm-up (Triton compilation, autotuning and the allocator's growth stay out); host_ms: the time until
   step() returns (host-bound when close to step_ms); peak memory: max_memory_allocated over warm-up and timed steps
   (weights, optimizer state and activations). ``--compile [--compile-mode reduce-overhead]``: the same under
   torch.compile (reduce-overhead: forward and backward replayed from CUDA graphs).
2. Generation images/s, CIFAR-10 shape: 3072 tokens per image, 16 layers, d=256, 8 heads, FFN 1024, at batch 1,
   16, 256, eval mode under autocast(bf16), through the model's own step(). Recurrent variants (linear, memsizer)
   cost the same at every position (fixed-size state), so a window of steps is timed and images/s = batch /
   (3072 x time per token); two windows check it is flat. Softmax with its KV cache costs more per token as the
   context grows: the cache is brought to contexts 0, 1024, 2048, 3056 with the model's prefill() (when it has
   one) and a window timed at each; the time for a whole image is the trapezoid over those points. ``+graph``:
   the same model through ``attnlab.decoding.CUDAGraphs(net, fuse=False)`` (the model's step replayed from a CUDA
   graph; softmax too: its KV cache is preallocated, and the graph's step reads all of it under a mask);
   ``+fused``: through ``CUDAGraphs(net)``, which replays the fused step (``attnlab.decoding.Fused``: a few fused
   kernels per layer); for both, whole images drawn with ``sample()`` timed end to end (``sample_img_s``). Time to
   first token (batch <= 16): a 3000-token prompt through prefill() plus one step.
Writes model_<label>.json and prints tables; `python3 bench/bench_model.py --report a.json b.json` prints the
tables and draws model_train.png / model_generate.png beside the first file."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

VARIANTS = {"softmax": {"name": "softmax"}, "linear": {"name": "linear"}, "memsizer": {"name": "memsizer", "k": 32},
            "topk": {"name": "topk", "k": 64}}
TOKENS = 16384  # per training step; from T = 32768 one sequence (B = 1), T tokens


def batch(T):
    return max(1, TOKENS // T)


def log(*a):
    print(*a, flush=True)


def decoder(attn, max_len, d, layers, heads, ff):
    from attnlab.transformer import TransformerDecoder
    return TransformerDecoder(attn, vocab_size=256, max_len=max_len, d_model=d, n_layers=layers, n_heads=heads,
                              d_ff=ff, dropout=0.0).cuda()


def sdpa_backend(model, x):
    """Names of the attention kernels one forward of the softmax model launches (cudnn / flash / efficient)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.autocast("cuda", torch.bfloat16):
        model(x)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    hits = sorted(n for n in names if any(s in n.lower() for s in ("cudnn", "flash", "fmha", "efficient", "sdpa")))
    kind = "cudnn" if any("cudnn" in n.lower() for n in hits) else "flash" if any("flash" in n.lower() for n in hits) \
        else "efficient" if any("efficient" in n.lower() or "fmha" in n.lower() for n in hits) else "unknown"
    return kind, hits[:4]


def training_step(variant, T, compile_model=False):
    """(model, step): the benchmark's model and one training step on a fixed batch of batch(T) x T tokens, as
    `trainer=gpu` runs it (autocast bf16, fwd + bwd + AdamW). ``compile_model``: True or a torch.compile mode."""
    torch.manual_seed(0)
    model = decoder(VARIANTS[variant], T, 512, 8, 8, 2048)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = model if not compile_model else torch.compile(model, **({} if compile_model is True else
                                                                    {"mode": compile_model}))
    x = torch.randint(0, 256, (batch(T), T), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(fwd(x).flatten(0, 1).float(), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return model, step


def train_point(variant, T, compile_model, steps, warm):
    model, step = training_step(variant, T, compile_model)
    # the peak is taken over the warm-up too: a CUDA-graph mode (reduce-overhead) allocates its memory pool there
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warm):
        loss = step()
    torch.cuda.synchronize()
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss {loss.item()}")
    times, host = [], []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        host.append(time.perf_counter() - t)  # until step() returns: a step is host-bound when this ~ its time
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out = dict(tok_s=batch(T) * T / statistics.median(times), step_ms=1e3 * statistics.median(times),
               host_ms=1e3 * statistics.median(host), peak_mib=torch.cuda.max_memory_allocated() / 2 ** 20)
    if variant == "softmax":
        out["sdpa_backend"], out["sdpa_kernels"] = sdpa_backend(model, torch.randint(0, 256, (1, T), device="cuda"))
    del model, step
    torch.cuda.empty_cache()
    # each point compiles its own model: without a reset the shared forward code hits dynamo's recompile limit
    # after 8 points and the rest silently run eager
    torch._dynamo.reset()
    return out


@torch.no_grad()
def time_steps(model, state, B, n, warm=3):
    tok = torch.randint(0, 256, (B,), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        for _ in range(warm):
            model.step(tok, state)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            model.step(tok, state)
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


@torch.no_grad()
def first_token_ms(model, B, prompt_len, reps=2):
    """Time to first token: a prompt of ``prompt_len`` tokens through prefill() (the parallel kernels), then one
    step; the best of ``reps`` after one untimed run."""
    prompt = torch.randint(0, 256, (B, prompt_len), device="cuda")
    tok = prompt[:, -1]
    best = float("inf")
    with torch.autocast("cuda", torch.bfloat16):
        for i in range(reps + 1):
            state = model.init_state(B)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.prefill(prompt, state)
            model.step(tok, state)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t) if i else best
    return 1e3 * best


@torch.no_grad()
def generate_point(variant, B, window, prompt_len=3000):
    from attnlab.decoding import CUDAGraphs
    torch.manual_seed(0)
    base, _, mode = variant.partition("+")  # "" (eager), "graph" (the model's step replayed) or "fused"
    graphed = mode in ("graph", "fused")
    net = decoder(VARIANTS[base], 3072 + 64, 256, 16, 8, 1024).eval()
    model = CUDAGraphs(net, fuse=mode == "fused") if graphed else net
    L = 3072
    ttft = dict(ttft_ms=first_token_ms(model, B, prompt_len), prompt=prompt_len) if B <= 16 else {}
    if base in ("linear", "memsizer"):
        state = model.init_state(B)
        t1 = time_steps(model, state, B, window)
        t2 = time_steps(model, state, B, window, warm=0)
        per_tok = min(t1, t2)
        out = dict(img_s=B / (L * per_tok), ms_per_token=1e3 * per_tok, windows_ms=[1e3 * t1, 1e3 * t2],
                   method="timed window, flat state", **ttft)
        return dict(out, sample_img_s=sample_img_s(model, B, L)) if graphed else out
    points = []
    if not hasattr(model, "prefill"):
        state = model.init_state(B)
        per = time_steps(model, state, B, window)
        return dict(img_s=B / (L * per), ms_per_token=1e3 * per, method="context 0 only (no prefill): upper bound",
                    **ttft)
    for c in (0, 1024, 2048, L - 16):
        state = model.init_state(B)
        if c:
            with torch.autocast("cuda", torch.bfloat16):
                for s in range(0, c, 512):  # chunked so the prompt's activations stay small at batch 256
                    model.prefill(torch.randint(0, 256, (B, min(512, c - s)), device="cuda"), state)
        points.append((c, time_steps(model, state, B, min(window, 8), warm=2)))
    total = sum((points[i + 1][0] - points[i][0]) * (points[i][1] + points[i + 1][1]) / 2
                for i in range(len(points) - 1)) + (L - points[-1][0]) * points[-1][1]
    out = dict(img_s=B / total, ms_per_token=1e3 * total / L, ms_at_context={c: 1e3 * t for c, t in points},
               method="trapezoid over contexts (prefill + timed window)", **ttft)
    # graphed softmax: each window's KV cache is as large as its context needs (doubling), while sample() reserves
    # the whole image up front, and its graph's step reads all of that cache under a mask: timed too
    return dict(out, sample_img_s=sample_img_s(model, B, L)) if graphed else out


def sample_img_s(model, B, L):
    """Whole images through sample(): the search's own per-token work (softmax, multinomial) included."""
    from attnlab.decoding import sample
    bos = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.autocast("cuda", torch.bfloat16):
        sample(model, bos, 8, generator=gen)
        torch.cuda.synchronize()
        t = time.perf_counter()
        sample(model, bos, L, generator=gen)
        torch.cuda.synchronize()
    return B / (time.perf_counter() - t)


def table(rows, key, label, cell) -> list[str]:
    """Markdown lines: one row per variant, one column per value of ``key`` (labelled ``label(value)``); a cell is
    ``cell(point)``, the point's error, or empty where that point was not run."""
    cols = sorted({r[key] for r in rows})
    lines = ["| variant | " + " | ".join(label(c) for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for v in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for c in cols:
            r = next((r for r in rows if r["variant"] == v and r[key] == c), None)
            cells.append("" if r is None else r["error"][:40] if "error" in r else cell(r))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def report(paths):
    runs = [json.load(open(p)) for p in paths]
    lines = []
    for run in runs:
        lines.append(f"\n### {run['label']}: {run['device']} | torch {run['torch']} | triton {run['triton']} | "
                     f"{run['date']}")
        lines.append("\n**training tokens/s (k), peak MiB** (B*T = 16384, from T = 32768 B = 1; autocast bf16, "
                     "fwd+bwd+AdamW)\n")
        lines += table(run["train"], "T", lambda T: f"T={T}", lambda r: f"{r['tok_s'] / 1e3:.0f}k, {r['peak_mib']:.0f}")
        sb = {r.get("sdpa_backend") for r in run["train"] if r.get("sdpa_backend")}
        if sb:
            lines.append(f"\nsoftmax ran on SDPA's `{'/'.join(sorted(sb))}` backend (default selection).")
        if run.get("generate"):
            lines.append("\n**generation images/s** (3072 tokens, 16 layers, d=256; ms per token)\n")
            lines += table(run["generate"], "B", lambda B: f"batch {B}",
                           lambda r: f"{r['img_s']:.2f} ({r['ms_per_token']:.2f} ms)"
                           + (f"; sample() {r['sample_img_s']:.2f}" if "sample_img_s" in r else "")
                           + (f"; first token {r['ttft_ms']:.0f} ms" if "ttft_ms" in r else ""))
    text = "\n".join(lines)
    print(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        # one line per variant over all the runs given (a later run's point replaces an earlier one at the same
        # T); colour per attention, solid when compiled (CUDA graphs), dashed eager
        points = {}
        for run in runs:
            for r in run["train"]:
                if "tok_s" in r:
                    points.setdefault(r["variant"], {})[r["T"]] = r["tok_s"]
        colours = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
        fig, ax = plt.subplots(figsize=(7, 4))
        for v, pts in points.items():
            base = v.split("+")[0]
            ax.plot(*zip(*sorted(pts.items())), marker="o", color=colours.get(base, "k"),
                    ls="-" if "+" in v else "--", label=v)
        ax.set(xscale="log", xlabel="T (B*T = 16384; B = 1 from 32768)", ylabel="training tokens/s",
               title="TransformerDecoder 8x512, bf16 autocast")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        fig.savefig(os.path.join(os.path.dirname(paths[0]) or ".", "model_train.png"), dpi=120)
    except Exception as e:  # noqa: BLE001 - the tables are the result; a plot is a convenience
        print("plot failed:", e)
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--label", default="after")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--T", nargs="+", type=int, default=[1024, 4096, 8192, 16384])
    ap.add_argument("--gen-variants", nargs="*",
                    default=["linear", "linear+graph", "linear+fused", "memsizer", "memsizer+graph", "memsizer+fused",
                             "softmax", "softmax+graph"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 256])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--window", type=int, default=24)
    ap.add_argument("--compile", action="store_true", help="also train each variant under torch.compile")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode for --compile (e.g. reduce-overhead: the steps replayed from CUDA graphs)")
    ap.add_argument("--compiled-only", action="store_true", help="with --compile: skip the eager training points")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--topk-config", type=json.loads, default={},
                    help="overrides of the top-k threshold kernels' CONFIG, e.g. '{\"atomic_dq\": true}'")
    ap.add_argument("--report", nargs="+", help="print tables / draw plots from these JSON files and exit")
    args = ap.parse_args()
    if args.report:
        report(args.report)
        return
    import triton
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"model_{args.label}.json")
    from attnlab.kernels.topk_attn import threshold
    threshold.CONFIG.update(args.topk_config)
    run = dict(label=args.label, device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               topk_config=dict(threshold.CONFIG), train=[], generate=[])
    t0 = time.time()
    # T-major, so the variants of one T run side by side even when the budget cuts the last T
    plan = [] if args.compile and args.compiled_only else [(v, T, False) for T in args.T for v in args.variants]
    if args.compile:
        plan += [(v, T, args.compile_mode or True) for T in args.T for v in args.variants]
    for v, T, comp in plan:
        name = v + ("" if not comp else "+compile" if comp is True else f"+{comp}")
        if time.time() - t0 > args.budget_s:
            run["train"].append(dict(variant=name, T=T, error="skipped: budget"))
            continue
        try:
            r = train_point(v, T, comp, args.steps, args.warm)
        except Exception as e:  # noqa: BLE001 - recorded; the next point still runs
            r = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            torch.cuda.empty_cache()
        run["train"].append(dict(variant=name, T=T, **r))
        log(f"train {name:18s} T={T:6d} {r}")
        json.dump(run, open(path, "w"), indent=1)
    for v in args.gen_variants:
        for B in args.batches:
            if time.time() - t0 > args.budget_s:
                run["generate"].append(dict(variant=v, B=B, error="skipped: budget"))
                continue
            try:
                r = generate_point(v, B, args.window)
            except Exception as e:  # noqa: BLE001
                r = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                torch.cuda.empty_cache()
            run["generate"].append(dict(variant=v, B=B, **r))
            log(f"generate {v:10s} B={B:4d} {r}")
            json.dump(run, open(path, "w"), indent=1)
    run["wall_s"] = time.time() - t0
    json.dump(run, open(path, "w"), indent=1)
    report([path])


if __name__ == "__main__":
    main()
