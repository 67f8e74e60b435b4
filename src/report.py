"""Tabulate and plot a run or a sweep: `python -m attnlab.report multirun/2026-12-01/20-00-00 [--metric val/acc]`.

Reads every results.json under the directory (one per job), finds what the jobs were swept over (the config values
that differ between them, named by the jobs' `.hydra/overrides.yaml` where it exists), and writes
  report.md   one row per run: swept values, metrics, steps, wall time, parameters; best first, marked
  report.png  the metric against each swept value (numbers as points, categories as bars of their best run)
into the directory (or --out), and logs both to wandb (offline unless you are logged in; --no-wandb to skip)."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import yaml

from .io import atomic_write

log = logging.getLogger("attnlab")

# Metrics where lower is better; any other metric a report is not told the direction of counts as higher-is-better.
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "bits", "wer", "cer", "error", "bpc", "bpd")
# Config keys that hold where a run wrote, not what it ran: they differ between any two runs.
PATH_KEYS = ("paths.",)


class Run:
    """One job: its results.json, flattened config and (if Hydra wrote them) its command-line overrides."""

    def __init__(self, path: Path, root: Path):
        self.dir = path.parent
        self.name = str(self.dir.relative_to(root)) if self.dir != root else "."
        self.results = json.loads(path.read_text())
        self.metrics: dict = self.results.get("metrics", {})
        self.config = flatten(self.results.get("config", {}))
        overrides = self.dir / ".hydra" / "overrides.yaml"
        self.overrides: dict[str, str] = {}
        if overrides.is_file():
            for item in yaml.safe_load(overrides.read_text()) or []:
                key, _, value = str(item).partition("=")
                self.overrides[key.lstrip("+~")] = value


def flatten(cfg, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples (comparable, hashable)."""
    out = {}
    for k, v in (cfg or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def find_runs(root: Path) -> list[Run]:
    paths = sorted(root.rglob("results.json"), key=lambda p: [_natural(s) for s in p.relative_to(root).parts])
    if not paths:
        raise SystemExit(f"no results.json under {root}: give a run's output dir or a sweep's (multirun/<date>/<time>)")
    return [Run(p, root) for p in paths]


def _natural(s: str):
    """Sort `10_x` after `2_x`: job numbers as numbers."""
    head, sep, tail = s.partition("_")
    return (0, int(head), tail) if head.isdigit() else (1, 0, s)


def swept_keys(runs: list[Run]) -> list[str]:
    """What differs between the runs: overridden keys first (as typed, `attention=softmax` reads `attention`), then
    config values that differ but are not explained by an overridden group or key, nor by where a run wrote."""
    def differs(values):
        return len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1

    keys = []
    override_keys = sorted({k for r in runs for k in r.overrides})
    for k in override_keys:
        if differs([_value(r, k) for r in runs]):
            keys.append(k)
    covered = tuple(k.replace("/", ".") + "." for k in keys)
    for k in sorted({k for r in runs for k in r.config}):
        if k in keys or k.startswith(covered) or k.startswith(PATH_KEYS) or _is_path_of_run(runs, k):
            continue
        values = [r.config.get(k) for r in runs]
        # an interpolated copy (model.net.attention.k is ${attention}'s attention.k) is not swept twice
        if differs(values) and not any(k.endswith("." + j) and values == [_value(r, j) for r in runs] for j in keys):
            keys.append(k)
    return keys


def _is_path_of_run(runs: list[Run], key: str) -> bool:
    """A value that names the run's own output dir (a checkpoint dir, a logger's save_dir) in every run."""
    outs = [r.config.get("paths.output_dir") for r in runs]
    return all(isinstance(o, str) and o and isinstance(r.config.get(key), str) and o in r.config[key]
               for r, o in zip(runs, outs))


def _value(run: Run, key: str):
    """A swept key's value for a run: the config's (typed), or the override as written (a group's choice)."""
    if key in run.config:
        return run.config[key]
    if key in run.overrides:
        v = run.overrides[key]
        try:
            parsed = yaml.safe_load(v)
        except yaml.YAMLError:
            return v
        return parsed if isinstance(parsed, (int, float, bool, str)) or parsed is None else v
    return run.config.get(f"{key}.name")  # a group chosen without an override (its default): its name


def choose_metric(runs: list[Run], metric: str | None, mode: str | None) -> tuple[str, str]:
    """The metric (default: the runs' optimized_metric) and its direction (default: the task's monitor.mode)."""
    if metric is None:
        named = {r.config.get("optimized_metric") for r in runs} - {None}
        metric = named.pop() if len(named) == 1 else "val/loss"
    if mode is None:
        for r in runs:
            if metric in (r.config.get("optimized_metric"), r.config.get("monitor.metric")) and r.config.get(
                    "monitor.mode") in ("min", "max"):
                mode = r.config["monitor.mode"]
                break
        else:
            mode = "min" if any(w in metric.lower() for w in LOWER_IS_BETTER) else "max"
    if mode not in ("min", "max"):
        raise SystemExit(f"--mode {mode!r}: expected min or max")
    return metric, mode


def rank(runs: list[Run], metric: str, mode: str) -> list[Run]:
    """Best first; runs without the metric (or with NaN) last, in their original order."""
    def key(r):
        v = r.metrics.get(metric)
        if not isinstance(v, (int, float)) or math.isnan(v):
            return (1, 0.0)
        return (0, v if mode == "min" else -v)
    return sorted(runs, key=key)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def metric_columns(runs: list[Run], metric: str) -> list[str]:
    """The ranked metric, then the other validation and test metrics (training ones are a moving average); extra test
    sets log as ``test_<name>/...``."""
    others = sorted({k for r in runs for k in r.metrics if k.startswith(("val/", "test/", "test_"))} - {metric})
    return [metric, *others]


def markdown(root: Path, runs: list[Run], keys: list[str], metric: str, mode: str, optuna: dict | None) -> str:
    ranked = rank(runs, metric, mode)
    best = ranked[0] if ranked and isinstance(ranked[0].metrics.get(metric), (int, float)) else None
    cols = metric_columns(runs, metric)
    head = ["", "run", *keys, *cols, "steps", "wall time (s)", "parameters"]
    lines = [f"# Report: {root}", "",
             f"{len(runs)} run(s), ranked by `{metric}` ({'lower' if mode == 'min' else 'higher'} is better)"
             + (f"; swept: {', '.join(f'`{k}`' for k in keys)}." if keys else "; nothing differs between them."), ""]
    if best is not None:
        lines += [f"Best: **{best.name}** with {metric} = {_fmt(best.metrics[metric])}.", ""]
    if optuna:
        lines += [f"Optuna's best value: {_fmt(optuna.get('best_value'))}, parameters: "
                  + ", ".join(f"`{k}={_fmt(v)}`" for k, v in (optuna.get("best_params") or {}).items()), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ranked:
        mark = "**best**" if r is best else ""
        name = r.name if len(r.name) <= 40 else r.name[:39] + "…"  # sweep dirs start with the job number
        row = [mark, f"`{name}`", *(_fmt(_value(r, k)) for k in keys),
               *(_fmt(r.metrics.get(c)) for c in cols),
               _fmt(r.results.get("steps")), _fmt(_round(r.results.get("wall_time_s"))), _fmt(r.results.get("parameters"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _round(x):
    return round(x, 1) if isinstance(x, float) else x


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot(path: Path, runs: list[Run], keys: list[str], metric: str, mode: str) -> None:
    """The metric against each swept value: numeric keys as points (log x when they span > 1 decade), others as
    bars of the best run per value with every run's point on top; the best run is a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in runs if _is_number(r.metrics.get(metric))]
    best = rank(scored, metric, mode)[0] if scored else None
    panels = keys or ["run"]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    pick = min if mode == "min" else max
    for ax, key in zip(axes.flat, panels):
        xs = [r.name if key == "run" else _value(r, key) for r in scored]
        ys = [r.metrics[metric] for r in scored]
        if xs and all(_is_number(x) for x in xs):
            ax.scatter(xs, ys, s=22, alpha=0.8)
            if min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
            if best is not None:
                ax.scatter([_value(best, key)], [best.metrics[metric]], marker="*", s=160, color="C3", zorder=3,
                           label="best")
        else:
            cats = sorted({_fmt(x) for x in xs}, key=str)
            pos = {c: i for i, c in enumerate(cats)}
            tops = [pick(y for x, y in zip(xs, ys) if _fmt(x) == c) for c in cats]
            ax.bar(range(len(cats)), tops, color="C0", alpha=0.35, label=f"{mode} per value")
            ax.scatter([pos[_fmt(x)] for x in xs], ys, s=22, color="C0")
            if best is not None:
                bx = best.name if key == "run" else _value(best, key)
                ax.scatter([pos[_fmt(bx)]], [best.metrics[metric]], marker="*", s=160, color="C3", zorder=3,
                           label="best")
            ax.set_xticks(range(len(cats)), cats, rotation=30 if len(cats) > 3 else 0, ha="right" if len(cats) > 3 else "center")
        ax.set_xlabel(key), ax.set_ylabel(metric), ax.grid(alpha=0.3)
        if best is not None:
            ax.legend(fontsize=8)
    fig.suptitle(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better): {len(scored)} of {len(runs)} "
                 f"run(s) have it")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def log_to_wandb(out: Path, root: Path, runs: list[Run], keys: list[str], metric: str, mode: str,
                 md_path: Path, png_path: Path) -> str:
    """One wandb run (job_type=report) holding the table, the plot and the markdown; returns its directory."""
    import wandb

    from .loggers import wandb_online

    ranked = rank(runs, metric, mode)
    cols = metric_columns(runs, metric)
    table = wandb.Table(columns=["run", *keys, *cols, "steps", "wall_time_s", "parameters"])
    for r in ranked:
        table.add_data(r.name, *(_fmt(_value(r, k)) for k in keys), *(r.metrics.get(c) for c in cols),
                       r.results.get("steps"), r.results.get("wall_time_s"), r.results.get("parameters"))
    run = wandb.init(project="attnlab", job_type="report", name=f"report-{root.name}", dir=str(out),
                     mode="online" if wandb_online() else "offline",
                     config={"root": str(root), "metric": metric, "mode": mode, "swept": keys})
    try:
        run.log({"report/table": table, "report/plot": wandb.Image(str(png_path)),
                 "report/markdown": wandb.Html(f"<pre>{md_path.read_text()}</pre>")})
        if ranked and _is_number(ranked[0].metrics.get(metric)):
            run.summary[f"best/{metric}"] = ranked[0].metrics[metric]
            run.summary["best/run"] = ranked[0].name
        return run.dir
    finally:
        run.finish()


def report(root: str | Path, metric: str | None = None, mode: str | None = None, out: str | Path | None = None,
           use_wandb: bool = True) -> dict:
    """Write report.md and report.png for the runs under ``root``; returns what it wrote and found."""
    root = Path(root).resolve()
    out = Path(out).resolve() if out else root
    out.mkdir(parents=True, exist_ok=True)
    runs = find_runs(root)
    keys = swept_keys(runs)
    metric, mode = choose_metric(runs, metric, mode)
    if not any(_is_number(r.metrics.get(metric)) for r in runs):
        known = sorted({k for r in runs for k in r.metrics})
        raise SystemExit(f"no run has the metric {metric!r}; the runs have {known}. Fix: --metric one of those")
    opt_file = root / "optimization_results.yaml"
    optuna = yaml.safe_load(opt_file.read_text()) if opt_file.is_file() else None
    md_path, png_path = out / "report.md", out / "report.png"
    atomic_write(md_path, markdown(root, runs, keys, metric, mode, optuna))
    plot(png_path, runs, keys, metric, mode)
    wandb_dir = None
    if use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            log.warning("wandb is not installed: report written, not logged")
        else:
            wandb_dir = log_to_wandb(out, root, runs, keys, metric, mode, md_path, png_path)
    ranked = rank(runs, metric, mode)
    return {"markdown": md_path, "plot": png_path, "metric": metric, "mode": mode, "swept": keys,
            "order": [r.name for r in ranked], "wandb_dir": wandb_dir}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m attnlab.report", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="a run's output dir or a sweep's (every results.json below it is read)")
    p.add_argument("--metric", help="rank by this metric (default: the runs' optimized_metric, else val/loss)")
    p.add_argument("--mode", choices=["min", "max"], help="direction (default: the task's monitor.mode for its "
                   "metric, else min for loss-like names, max otherwise)")
    p.add_argument("--out", help="write report.md / report.png here (default: DIR)")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True,
                   help="log the table and plot to wandb (offline unless logged in; default: on)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = report(args.dir, args.metric, args.mode, args.out, args.wandb)
    print(f"{len(res['order'])} run(s) ranked by {res['metric']} ({res['mode']}); swept: {res['swept'] or 'nothing'}")
    print(f"best: {res['order'][0]}")
    print(f"wrote {res['markdown']} and {res['plot']}" + (f"; wandb run in {res['wandb_dir']}" if res["wandb_dir"] else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
