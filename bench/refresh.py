"""One command for the generated part of bench/RESULTS.md (issue #11): run the op-level and whole-model benchmarks,
then write their tables and the issue's targets, each met or missed with its numbers, between the markers
``<!-- refresh:begin -->`` / ``<!-- refresh:end -->`` of RESULTS.md (the hand-written analysis around them stays).

    python3 bench/refresh.py --out DIR              # run both on this GPU (~15 min on an H200), then write
    python3 bench/refresh.py --from DIR [DIR ...]   # only write, from DIR/op{,_graph}/results.json, DIR/model_*.json

Training targets are read in the fastest mode measured for both variants (CUDA graphs, ``+reduce-overhead``, when
that run exists; eager otherwise) and say which. Where several model JSONs hold the same point, the later run wins.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
BEGIN, END = "<!-- refresh:begin -->", "<!-- refresh:end -->"
OP_VARIANTS = ["sdpa", "sdpa_flash", "linear_triton", "fla_chunk_raw", "memsizer_triton", "topk_triton"]
T_ALL = [1024, 2048, 4096, 8192, 16384]
TIMINGS = {"eager": ("op", "eager"), "graph": ("op_graph", "CUDA graphs")}  # --timing: (folder, label)


def run_benchmarks(out: str) -> None:
    py = sys.executable
    for timing in TIMINGS:  # op_graph/: the same ops replayed from CUDA graphs (GPU time, no launch overhead)
        subprocess.run([py, os.path.join(HERE, "bench_attention.py"), "--out", os.path.join(out, TIMINGS[timing][0]),
                        "--variants", *OP_VARIANTS, "--T", *map(str, T_ALL), "--timing", timing]
                       + (["--no-decode"] if timing == "graph" else []), check=True)
    # the fla and top-k op targets: kernel by kernel from CUDA graphs (fla_check), top-k beside cuDNN (topk_check)
    subprocess.run([py, os.path.join(HERE, "kernel_times.py"), "--out", os.path.join(out, "kernel_times"), "--ops",
                    *FLA_OPS, "fla", "--shapes", *(f"8,16,{T}" for T in T_ALL if T >= 4096)], check=True)
    subprocess.run([py, os.path.join(HERE, "check_topk_gpu.py"), "--out", out, "--name", "topk_threshold_final",
                    "--skip", "extra", "full", "stats", "sweep", "--T", *(str(T) for T in T_ALL if T >= 4096)],
                   check=True)
    subprocess.run([py, os.path.join(HERE, "bench_model.py"), "--out", out, "--label", "refresh", "--T",
                    *map(str, T_ALL), "--compile", "--compile-mode", "reduce-overhead", "--gen-variants",
                    "linear+fused", "memsizer+fused", "linear+graph", "memsizer+graph", "softmax", "softmax+graph",
                    "--batches", "1", "16", "256"], check=True)


def load(dirs: list[str]) -> tuple[dict, list[dict]]:
    """({timing: the newest op results timed that way}, every model run oldest first, by the date each wrote)."""
    ops = {}
    for r in sorted((json.load(open(p)) for d in dirs for t in TIMINGS
                     for p in glob.glob(os.path.join(d, TIMINGS[t][0], "results.json"))), key=lambda r: r["date"]):
        ops[r["config"].get("timing", "eager")] = r
    models = [json.load(open(p)) for d in dirs for p in glob.glob(os.path.join(d, "model_*.json"))]
    return ops, sorted(models, key=lambda r: r["date"])


def merged(runs: list[dict], part: str, key: str) -> dict:
    """{(variant, key value): point} over the runs; a later run's point replaces an earlier one. Ordered eager
    before compiled / graphed, then softmax, linear, memsizer, topk."""
    from bench_model import VARIANTS
    out = {}
    for run in runs:
        for r in run.get(part, []):
            if "error" not in r:
                out[(r["variant"], r[key])] = r
    order = list(VARIANTS)

    def rank(item):
        (variant, k), _ = item
        base, _, mode = variant.partition("+")
        return mode, order.index(base) if base in order else len(order), k
    return dict(sorted(out.items(), key=rank))


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "**met**" if ok else "**missed**"


def _per_T(target: str, ratios: dict, ok) -> tuple[str, str, str]:
    """A target that must hold at several T: the measured ratios ({T: ratio, None where not measured}) and whether
    ``ok(ratio)`` holds at all of them."""
    xs = {T: x for T, x in ratios.items() if x is not None}
    return (target, ", ".join(f"{x:.2f}x ({T})" for T, x in xs.items()) or "-",
            _verdict(all(ok(x) for x in xs.values()) if xs else None))


def train_targets(train: dict, runs: list[dict]) -> list[tuple[str, str, str]]:
    """(target, numbers, verdict) for the issue's training targets: ratios of tokens/s at the same T, both points
    from one run (the latest run that has both), as a ratio across runs would mix machine states."""
    modes = [m for m in ("+reduce-overhead", "") if all((v + m, 1024) in train for v in ("softmax", "linear"))]
    mode = modes[0] if modes else ""
    label = "CUDA graphs" if mode else "eager"

    def ratio(a, b, T):
        for run in reversed(runs):
            pts = {r["variant"]: r for r in run.get("train", []) if r["T"] == T and "error" not in r}
            if a + mode in pts and b + mode in pts:
                return pts[a + mode]["tok_s"] / pts[b + mode]["tok_s"]
        return None

    rows = []
    for T, want in ((1024, 1.0), (8192, 2.0), (16384, 4.0)):
        x = ratio("linear", "softmax", T)
        times = "" if want == 1 else f"{want:g}x "
        rows.append((f"linear >= {times}softmax tokens/s at T={T} ({label})", "-" if x is None else f"{x:.2f}x",
                     _verdict(None if x is None else x >= want)))
    rows.append(_per_T(f"MemSizer >= linear at every T ({label})",
                       {T: ratio("memsizer", "linear", T) for T in T_ALL}, lambda x: x >= 1.0))
    rows.append(_per_T(f"top-k >= 0.5x softmax at T >= 4096 ({label})",
                       {T: ratio("topk", "softmax", T) for T in T_ALL if T >= 4096}, lambda x: x >= 0.5))
    return rows


def generate_targets(gen: dict) -> list[tuple[str, str, str]]:
    rows = []
    for v in ("linear", "memsizer"):
        name = next((v + m for m in ("+fused", "+graph") if any(k[0] == v + m for k in gen)), v)
        at16 = gen.get((name, 16))
        best = max((p for (n, _), p in gen.items() if n == name), key=lambda p: p["img_s"], default=None)
        rows.append((f"{name}: >= 20 images/s at batch 16", "-" if at16 is None else f"{at16['img_s']:.2f}",
                     _verdict(None if at16 is None else at16["img_s"] >= 20)))
        rows.append((f"{name}: >= 200 images/s at the best batch",
                     "-" if best is None else f"{best['img_s']:.1f} (batch {best['B']})",
                     _verdict(None if best is None else best["img_s"] >= 200)))
    return rows


def _newest(dirs: list[str], name: str) -> str | None:
    """The file ``name`` in the last of dirs holding one."""
    return next((p for p in (os.path.join(d, name) for d in reversed(dirs)) if os.path.exists(p)), None)


def topk_check(dirs: list[str]) -> tuple[str | None, dict]:
    """The newest op timing of the top-k kernels by bench/check_topk_gpu.py (eager, cuDNN SDPA timed right before
    top-k at each T): (path, {T: {timer: (top-k, sdpa) fwd+bwd ms}}) from the last of dirs holding a
    topk_threshold_final.json; timer "back to back" is triton's do_bench (calls queued back to back: GPU time),
    "each call alone" the op tables' way (L2 flushed, synchronized after each call; ``fwdbwd_synced_ms``, runs
    from session 17 on), whose ratio to SDPA reads up to 8% higher (bench/RESULTS.md, session 18)."""
    p = _newest(dirs, "topk_threshold_final.json")
    if p is None:
        return None, {}
    out = {}
    for r in json.load(open(p))["results"]["timing"]:
        if "topk_triton" in r and "sdpa" in r:
            a, b = r["topk_triton"], r["sdpa"]
            out[r["T"]] = {"back to back": (a["fwdbwd_ms"], b["fwdbwd_ms"])}
            if "fwdbwd_synced_ms" in a and "fwdbwd_synced_ms" in b:
                out[r["T"]]["each call alone"] = (a["fwdbwd_synced_ms"], b["fwdbwd_synced_ms"])
    return p, out


# kernel_times.py's linear-attention ops, each a row of the fla target, and what each times
FLA_OPS = {"linear": "linear fwd+bwd",
           "linear_mapped": "features mapped before the timing, as fla's (the normalizer inside): linear_mapped",
           "linear_raw": "the same math as fla (features mapped before, no normalizer): linear_raw"}


def fla_check(dirs: list[str]) -> tuple[str | None, dict]:
    """The newest kernel-by-kernel run of bench/kernel_times.py (CUDA-graph replay, B=8, H=16, default CONFIG):
    (path, {T: {op: fwd+bwd ms}}) for linear (elu + 1 and the normalizer in the kernels), linear_mapped (features
    mapped before the timing, as fla's are; the normalizer inside), linear_raw (the same kernels on fla's math:
    features mapped before, no normalizer) and fla (normalize=False). It replaces the op tables' fla target, which
    compares the two ops on different work."""
    p = _newest(dirs, os.path.join("kernel_times", "kernel_times.json"))
    out = {}
    for r in json.load(open(p)) if p else []:
        if (r["B"], r["H"]) == (8, 16) and not r["config"] and "ms" in r and r["op"] in (*FLA_OPS, "fla"):
            out.setdefault(r["T"], {})[r["op"]] = r["ms"]
    return p, out


def op_targets(op: dict | None, with_fla: bool = True) -> list[tuple[str, str, str]]:
    """Op-level targets: fwd+bwd times at B, H of the run against the default SDPA backend and fla raw, labelled
    with how the run timed the calls (eager launches or CUDA-graph replay); the fla one only ``with_fla``."""
    label = TIMINGS[(op or {}).get("config", {}).get("timing", "eager")][1]
    pts = {}
    for r in (op or {}).get("rows", []):
        if r.get("fwdbwd_ms") is not None and (r["B"], r["H"]) == (op["config"]["B"], op["config"]["H"]):
            pts[(r["variant"], r["T"])] = r["fwdbwd_ms"]

    def row(target, a, b, Ts, limit):
        return _per_T(f"{target} ({label})",
                      {T: pts[(a, T)] / pts[(b, T)] for T in Ts if (a, T) in pts and (b, T) in pts},
                      lambda x: x <= limit)

    rows = [row("linear fwd+bwd <= default-backend SDPA at T >= 2048", "linear_triton", "sdpa",
                [T for T in T_ALL if T >= 2048], 1.0)]
    if with_fla:
        rows.append(row("linear fwd+bwd <= fla normalize=False at T >= 4096", "linear_triton", "fla_chunk_raw",
                        [T for T in T_ALL if T >= 4096], 1.0))
    rows.append(row("top-k (k=64) fwd+bwd <= 2x default-backend SDPA at T >= 4096", "topk_triton", "sdpa",
                    [T for T in T_ALL if T >= 4096], 2.0))
    return rows


def section(ops: dict, runs: list[dict], topk: tuple[str | None, dict] = (None, {}),
            fla: tuple[str | None, dict] = (None, {})) -> str:
    """The generated block; ``topk`` / ``fla``: topk_check's / fla_check's (path, timings); the first adds a row to
    the op tables' top-k targets, the second replaces their fla target."""
    from bench_model import table
    from plot import markdown
    lines = [BEGIN, "", "_Generated by `python3 bench/refresh.py`; edits here are overwritten._", ""]
    train, gen = merged(runs, "train", "T"), merged(runs, "generate", "B")
    if runs:
        last = runs[-1]
        dates = sorted(r["date"] for r in runs)
        lines += [f"Whole model: {last['device']} | torch {last['torch']} | triton {last['triton']} | "
                  f"{len(runs)} run{'s' if len(runs) > 1 else ''}, {dates[0]} to {dates[-1]}", "",
                  "**Training tokens/s (k), peak MiB** (TransformerDecoder 8 x 512, B*T = 16384, from T = 32768 "
                  "B = 1; autocast bf16, "
                  "fwd + bwd + AdamW; `+reduce-overhead`: torch.compile with CUDA graphs)", ""]
        lines += table(list(train.values()), "T", lambda T: f"T={T}",
                       lambda r: f"{r['tok_s'] / 1e3:.0f}k, {r['peak_mib']:.0f}")
        if gen:
            lines += ["", "**Generation images/s** (3072 tokens, 16 layers, d=256; ms per token)", ""]
            lines += table(list(gen.values()), "B", lambda B: f"batch {B}",
                           lambda r: f"{r['img_s']:.2f} ({r['ms_per_token']:.2f} ms)"
                           + (f"; first token {r['ttft_ms']:.0f} ms" if "ttft_ms" in r else ""))
        lines.append("")
    for timing, op in ops.items():
        lines += [f"Op level, {TIMINGS[timing][1]}: " + markdown(op).split("**forward time")[0].strip(), ""]
    lines += ["**Targets (issue #11)**", "", "| target | measured | verdict |", "|---|---|---|"]
    path, times = topk
    fpath, ftimes = fla
    rows = train_targets(train, runs) + generate_targets(gen) + [
        r for op in ops.values() for r in op_targets(op, with_fla=not ftimes)]
    if ftimes:
        src = f"CUDA graphs, bench/kernel_times.py: {os.path.relpath(fpath, os.path.dirname(HERE))}"
        for op, what in FLA_OPS.items():
            rows.append(_per_T(f"{what} <= fla normalize=False at T >= 4096 ({src})",
                               {T: t[op] / t["fla"] for T, t in ftimes.items() if T >= 4096 and op in t
                                and "fla" in t}, lambda x: x <= 1.0))
    for timer in ("back to back", "each call alone"):
        ratios = {T: t[timer][0] / t[timer][1] for T, t in times.items() if T >= 4096 and timer in t}
        if ratios:
            rows.append(_per_T(f"top-k (k=64) fwd+bwd <= 2x default-backend SDPA at T >= 4096 (eager, {timer}, "
                               f"bench/check_topk_gpu.py: {os.path.relpath(path, os.path.dirname(HERE))})",
                               ratios, lambda x: x <= 2.0))
    lines += [f"| {t} | {n} | {v} |" for t, n, v in rows]
    return "\n".join(lines + ["", END])


def write(results_md: str, text: str) -> None:
    """Replace the marked section of RESULTS.md (or put it after the title when there is none yet), atomically."""
    from attnlab.io import atomic_write
    old = open(results_md).read() if os.path.exists(results_md) else "# Benchmark results\n"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    elif BEGIN in old or END in old:
        raise ValueError(f"{results_md} has only one of the markers {BEGIN} / {END}: put both back or remove both")
    else:
        head, _, rest = old.partition("\n")
        new = f"{head}\n\n{text}\n{rest}"
    atomic_write(results_md, new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="run the benchmarks (GPU) into this folder, then write")
    ap.add_argument("--from", dest="src", nargs="+", help="only write, from these folders")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = ap.parse_args()
    if bool(args.out) == bool(args.src):
        ap.error("give one of --out DIR (run, then write) or --from DIR [DIR ...] (write only)")
    if args.out:
        run_benchmarks(args.out)
    ops, runs = load(args.src or [args.out])
    if not ops and not runs:
        sys.exit(f"no results.json under op/ or op_graph/ and no model_*.json in {args.src or args.out}")
    text = section(ops, runs, topk_check(args.src or [args.out]), fla_check(args.src or [args.out]))
    write(args.results, text)
    print(text)


if __name__ == "__main__":
    main()
