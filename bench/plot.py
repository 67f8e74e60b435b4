"""Markdown tables and log-log plots from the JSON that bench_attention.py writes.

    python bench/plot.py bench/out/results.json      # rewrites results.md, time.png, memory.png beside it
"""
from __future__ import annotations

import json
import os
import sys


def _rows(res, key):
    """{(variant, B, H): {T: value}} for the successful measurements of one field."""
    out = {}
    for r in res["rows"]:
        if r.get(key) is not None:
            out.setdefault((r["variant"], r["B"], r["H"]), {})[r["T"]] = r[key]
    return out


def _fmt(r, key, ratio_key, base):
    if r.get(key) is None:
        err = r.get(key.split("_")[0] + "_error")
        if err is None:
            return "-"  # not measured (memory on CPU)
        return "OOM" if err.startswith("OOM") else ("skip" if err.startswith("skipped") else "err")
    s = f"{r[key]:.3g}" if r[key] < 100 else f"{r[key]:.0f}"
    if r.get(ratio_key) is not None and r["variant"] != base:
        x = r[ratio_key]
        s += f" ({x:.0f}x)" if x >= 100 else f" ({x:.2g}x)"
    return s


def markdown(res) -> str:
    """Short tables: one row per (T, B, H), one column per variant; errors shown as OOM/skip/err (JSON has why)."""
    measured = {r["variant"] for r in res["rows"]}
    variants = [v for v in res["config"]["variants"] if v in measured]
    rows = {}
    for r in res["rows"]:
        rows.setdefault((r["T"], -r["B"], r["H"]), {})[r["variant"]] = r
    keys = sorted(rows)
    lines = [f"device: {res['device']} | torch {res['torch']} | triton {res['triton']} | fla {res['fla']} | "
             f"{res['date']} | commit {res['commit']} | {res['config']['dtype']}, D={res['config']['D']}", ""]
    if res.get("unavailable"):
        lines += ["not run: " + "; ".join(f"{k} ({v[:80]})" for k, v in res["unavailable"].items()), ""]
    base = res.get("baseline", "sdpa_flash")  # results written before the default backend was the baseline
    tables = [(f"fwd+bwd time, ms (x {base} at the same shape)", "fwdbwd_ms", "fwdbwd_x_sdpa"),
              (f"forward time, ms (x {base})", "fwd_ms", "fwd_x_sdpa"),
              (f"fwd+bwd peak memory above inputs, MiB (x {base})", "fwdbwd_mem_mib", "fwdbwd_mem_x_sdpa")]
    for title, key, ratio in tables:
        lines += [f"**{title}**", "", "| T | B,H | " + " | ".join(variants) + " |",
                  "|---|---|" + "---|" * len(variants)]
        for T, mB, H in keys:
            cells = [_fmt(rows[(T, mB, H)][v], key, ratio, base) if v in rows[(T, mB, H)] else "" for v in variants]
            lines.append(f"| {T} | {-mB},{H} | " + " | ".join(cells) + " |")
        lines.append("")
    dec = res.get("decode") or []
    if dec:
        lines += ["**decode step, us (B={B}, H={H}, d={D}; CUDA graph replay where captured)**".format(**res["config"]["decode"]),
                  "", "| op | context | graph us | eager us |", "|---|---|---|---|"]
        for d in dec:
            g = f"{d['graph_us']:.1f}" if d.get("graph_us") is not None else (d.get("graph_error") or "-")[:40]
            e = f"{d['eager_us']:.1f}" if d.get("eager_us") is not None else (d.get("error") or "-")[:40]
            lines.append(f"| {d['op']} | {d.get('context') or 'any'} | {g} | {e} |")
    return "\n".join(lines) + "\n"


def plot(res, out_dir: str) -> list[str]:
    """time.png (fwd, fwd+bwd) and memory.png, log-log against T. Points measured at the fallback shape
    (smaller B, H) are drawn dashed with hollow markers: compare them only with each other."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    main = (cfg["B"], cfg["H"])
    colors = {v: f"C{i % 10}" for i, v in enumerate(cfg["variants"])}
    written = []
    for fname, panels in (("time.png", [("fwd_ms", "forward, ms"), ("fwdbwd_ms", "forward+backward, ms")]),
                          ("memory.png", [("fwd_mem_mib", "forward peak MiB above inputs"),
                                          ("fwdbwd_mem_mib", "fwd+bwd peak MiB above inputs")])):
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8))
        drew = False
        for ax, (key, label) in zip(axes, panels):
            for (v, B, H), pts in sorted(_rows(res, key).items()):
                Ts = sorted(pts)
                is_main = (B, H) == main
                ax.plot(Ts, [max(pts[t], 1e-3) for t in Ts], ("-o" if is_main else "--o"), color=colors.get(v, "k"),
                        mfc=None if is_main else "none", label=v if is_main else f"{v} (B={B},H={H})")
                drew = True
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{label} (B={main[0]}, H={main[1]}, D={cfg['D']}, {cfg['dtype']})", fontsize=9)
        if drew:
            axes[-1].legend(fontsize=7)
        fig.suptitle(f"{res['device']}, torch {res['torch']}, triton {res['triton']}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/plot.py path/to/results.json")
    with open(sys.argv[1]) as f:
        res = json.load(f)
    out = os.path.dirname(os.path.abspath(sys.argv[1]))
    md = markdown(res)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print("\n".join(plot(res, out)))
    print(md)
