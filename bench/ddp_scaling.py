"""Multi-GPU DDP measurements of issue #12: scaling, equivalence, kill-and-resume. One file, one call.

Every run is `python train.py ... trainer=ddp trainer.devices=N` (Lightning starts the N processes itself), as a user
would run it; the numbers come from each run's results.json and csv/metrics.csv.

- scaling (always): the LM task (task=lm on ${data_dir}/bible, T=1024) and translation (task=wmt, gramps) with
  attention in {linear, memsizer, softmax, topk}, on N in --devices (default 1, 2 and 4/8 where
  torch.cuda.device_count() has them), the same PER-DEVICE batch, a fixed number of steps, with the Throughput
  callback (attnlab.callbacks): tokens/s per device over a window after a warm-up, and peak memory per device.
  Scaling efficiency = (tokens/s per device at N) / (tokens/s at 1). Target (issue #12): >= 0.9 at N=2.
- --equivalence: the same GLOBAL batch on 1 and 2 devices (batch B on 1, B/2 on each of 2), dropout 0, fp32, validation
  every --val-every steps for --equiv-steps steps; reports the largest relative difference of the val/loss curves.
- --fault: a run on N=2 (the largest of --devices <= 2) is SIGKILLed (its whole process group) mid-epoch once its
  first last.ckpt exists, resumed from that last.ckpt on the same N, and its val/loss curve compared to an
  uninterrupted run's.
- --cpu: everything tiny on the CPU (gloo, 2 processes): the logic check; its speed numbers mean nothing.

Writes into --out: ddp_scaling.json (every run, machine facts: GPU name and count, torch version, commit),
ddp_scaling.md (tables) and ddp_scaling.png (tokens/s per device against N; needs matplotlib).

Data: `python -m attnlab.tasks.prepare bible` and `... gramps` make data/bible and data/gramps-en-de; the parts the
runs read are data/bible/data-bin (4.5 MiB) and data/gramps-en-de (1.5 MiB: data-bin, and raw for the references),
small enough to carry to the device machine (64 MiB limit). The GPU image lacks hydra-core/omegaconf/wandb: fill .whl/
first, here, with `../shared/tools/gpu-wheels`. Then ONE device-tool call (kind nvidia-h200-x2, -x4 or -x8),
carry [".whl", "data/bible/data-bin", "data/gramps-en-de"]:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
      && python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . \\
      && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 || exit; \\
      python3 bench/ddp_scaling.py --out $OUT/ddp --commit <sha> --equivalence --fault 2>&1 | tee $OUT/ddp_log.txt

(the second pip line installs attnlab itself from the copied tree: the package maps src/ to attnlab, so PYTHONPATH=.
is not enough). Checkpoints are deleted after each run (a 10M-parameter model's last.ckpt with Adam state is ~120 MB,
more than the device tool brings back); --keep-checkpoints keeps them.

Budget: a device-tool command runs at most 10 minutes, so --budget-s (default 540) stops starting runs once spent
(the ones not run are listed as skipped) and the report is rewritten after every section. Everything is 2 tasks x 4
attentions x |devices| scaling runs (~30-60 s each with DDP start-up), 2 x 4 x 2 equivalence runs and 3 fault runs:
more than one call. Split it, e.g. call 1: `--tasks lm`; call 2: `--tasks wmt`; call 3: `--skip-scaling
--equivalence --fault --attention linear,softmax` (each with its own --out). A failed run does not stop the script:
its error (the tail of its stderr) is recorded.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTENTIONS = ("linear", "memsizer", "softmax", "topk")
TASKS = ("lm", "wmt")
THROUGHPUT = "+callbacks.throughput._target_=attnlab.callbacks.Throughput"

# Per-device batches. GPU: T=1024 LM blocks (the T >= 1024 target) and fairseq-style token batches for WMT.
GPU = {"lm": ["task=lm", "task.tokens_per_sample=1024", "task.batch_size=8"],
       "wmt": ["task=wmt", "task.max_tokens=4096"]}
CPU_TINY = ["model.net.d_model=32", "model.net.n_heads=2", "model.net.d_ff=64"]
CPU = {"lm": ["task=lm", "task.tokens_per_sample=32", "task.batch_size=4", "model.net.n_layers=1", *CPU_TINY],
       "wmt": ["task=wmt", "task.max_tokens=256", "model.net.encoder_layers=1", "model.net.decoder_layers=1",
               *CPU_TINY]}
# Equivalence needs a global batch that splits exactly in two: a fixed number of samples (batch_size), not tokens.
EQ_GPU = {"lm": ["task=lm", "task.tokens_per_sample=1024", "task.batch_size=16"],
          "wmt": ["task=wmt", "task.max_tokens=null", "task.batch_size=64"]}
EQ_CPU = {"lm": CPU["lm"][:2] + ["task.batch_size=8"] + CPU["lm"][3:],
          "wmt": ["task=wmt", "task.max_tokens=null", "task.batch_size=8", *CPU["wmt"][2:]]}


def machine(commit: str | None) -> dict:
    import torch
    facts = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
             "cuda_devices": torch.cuda.device_count()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    if commit:  # the device machine's copy of the tree may have no .git
        facts["commit"] = commit
        return facts
    try:
        facts["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                         timeout=10).stdout.strip() or "unknown (no git here)"
    except OSError:
        facts["commit"] = "unknown (no git here)"
    return facts


def command(args, task_args, attention, devices, out, steps, extra=(), precision=None) -> list[str]:
    hw = (["trainer.accelerator=cpu"] if args.cpu else
          ["trainer.accelerator=gpu", f"trainer.precision={precision or args.precision}"])
    ddp = ["trainer=ddp", f"trainer.devices={devices}"]  # N=1 too: the same code path, one process
    return [sys.executable, "train.py", *task_args, f"attention={attention}", *ddp, *hw, "logger=csv", "test=false",
            "trainer.enable_progress_bar=false", f"trainer.max_steps={steps}", f"hydra.run.dir={out}", *extra]


def env(args) -> dict:
    e = {**os.environ, "WANDB_MODE": "disabled"}
    if args.cpu:
        e["OMP_NUM_THREADS"] = "1"
    return e


DEADLINE = float("inf")


def out_of_time() -> bool:
    return time.time() > DEADLINE


def launch(cmd, args, timeout=None) -> tuple[int, str]:
    """Runs one training job in its own process group; returns (exit status, stderr tail)."""
    if out_of_time():
        return -1, "skipped: --budget-s spent"
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        return -9, f"timed out after {timeout} s\n{err[-2000:]}"
    return p.returncode, err[-3000:]


def drop_checkpoints(args, run_dir: Path) -> None:
    if not args.keep_checkpoints:
        for f in run_dir.glob("checkpoints/*.ckpt"):
            f.unlink()


def metrics(out: Path) -> list[dict]:
    path = out / "csv/metrics.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def val_curve(out: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["val/loss"]) for r in metrics(out) if r.get("val/loss")}


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float | None:
    common = sorted(set(a) & set(b))
    if not common:
        return None
    return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in common)


# -- scaling ------------------------------------------------------------------------------------------------------
def scaling(args, out: Path) -> list[dict]:
    rows = []
    table = CPU if args.cpu else GPU
    for task in args.tasks:
        for attention in args.attention:
            for n in args.devices:
                run_dir = out / "runs" / f"scale-{task}-{attention}-{n}"
                extra = [THROUGHPUT, f"+callbacks.throughput.warmup_steps={args.warmup}",
                         f"+callbacks.throughput.window_steps={args.steps - args.warmup}",
                         "trainer.limit_val_batches=0"]
                t0 = time.time()
                rc, err = launch(command(args, table[task], attention, n, run_dir, args.steps, extra), args,
                                 args.run_timeout)
                row = {"task": task, "attention": attention, "devices": n, "rc": rc, "seconds": time.time() - t0}
                tp = [r for r in metrics(run_dir) if r.get("train/tokens_per_sec")]
                if rc == 0 and tp:
                    r = tp[-1]
                    row.update(tokens_per_sec=float(r["train/tokens_per_sec"]),
                               tokens_per_sec_per_device=float(r["train/tokens_per_sec_per_device"]),
                               window_tokens=float(r["train/tokens"]), window_seconds=float(r["train/seconds"]))
                    if r.get("train/peak_memory_mb"):
                        row["peak_memory_mb_per_device"] = float(r["train/peak_memory_mb"])
                else:
                    row["error"] = err if rc else "no train/tokens_per_sec logged"
                drop_checkpoints(args, run_dir)
                print(json.dumps(row)[:400], flush=True)
                rows.append(row)
    for row in rows:  # efficiency against the same task x attention on 1 device
        base = next((r for r in rows if r["task"] == row["task"] and r["attention"] == row["attention"]
                     and r["devices"] == 1 and "tokens_per_sec" in r), None)
        if base and "tokens_per_sec_per_device" in row:
            row["efficiency"] = row["tokens_per_sec_per_device"] / base["tokens_per_sec"]
    return rows


# -- equivalence -------------------------------------------------------------------------------------------------
def equivalence(args, out: Path) -> list[dict]:
    rows = []
    table = EQ_CPU if args.cpu else EQ_GPU
    for task in args.tasks:
        for attention in args.attention:
            curves, errors = {}, {}
            for n in (1, 2):
                task_args = [a if not a.startswith("task.batch_size=") else
                             f"task.batch_size={int(a.split('=')[1]) // n}" for a in table[task]]
                run_dir = out / "runs" / f"equiv-{task}-{attention}-{n}"
                rc, err = launch(command(args, task_args, attention, n, run_dir, args.equiv_steps,
                                         ["model.net.dropout=0.0", f"trainer.val_check_interval={args.val_every}",
                                          f"trainer.limit_val_batches={args.val_batches}"], precision="32"),
                                 args, args.run_timeout)
                curves[n] = val_curve(run_dir)
                drop_checkpoints(args, run_dir)
                if rc:
                    errors[n] = err
            row = {"task": task, "attention": attention, "val_steps": sorted(curves[1]),
                   "val_loss_1": [curves[1][s] for s in sorted(curves[1])],
                   "val_loss_2": [curves[2].get(s) for s in sorted(curves[1])],
                   "same_steps": sorted(curves[1]) == sorted(curves[2]) and bool(curves[1]),
                   "max_rel_diff": max_rel_diff(curves[2], curves[1])}
            if errors:
                row["error"] = errors
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("val_loss")})[:400], flush=True)
            rows.append(row)
    return rows


# -- kill and resume ---------------------------------------------------------------------------------------------
def fault(args, out: Path) -> dict:
    n = max(d for d in args.devices if d <= 2)
    task, attention = args.tasks[0], args.attention[0]
    table = EQ_CPU if args.cpu else EQ_GPU
    extra = ["model.net.dropout=0.0", f"trainer.val_check_interval={args.val_every}",
             f"trainer.limit_val_batches={args.val_batches}"]
    steps = args.equiv_steps
    full, killed, resumed = (out / "runs" / f"fault-{task}-{attention}-{k}" for k in ("full", "killed", "resumed"))
    row = {"task": task, "attention": attention, "devices": n, "steps": steps}
    if out_of_time():
        return {**row, "error": "skipped: --budget-s spent", "killed_while_running": False, "resumed_from_step": None,
                "final_steps": None, "max_rel_diff": None, "val_steps_full": [], "val_steps_resumed": []}
    rc, err = launch(command(args, table[task], attention, n, full, steps, extra, "32"), args, args.run_timeout)
    row["full_rc"] = rc
    # the run to kill: SIGKILL to its whole process group (launcher and every rank) once a last.ckpt exists, a
    # little later, so that the kill lands mid-epoch between two validations (no chance to save anything more)
    p = subprocess.Popen(command(args, table[task], attention, n, killed, steps, extra, "32"), cwd=ROOT, env=env(args),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpt = killed / "checkpoints/last.ckpt"
    deadline = time.time() + args.run_timeout
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(args.kill_delay)
    row["killed_while_running"] = p.poll() is None
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    try:  # what the killed run had reached: the step stored in last.ckpt
        import torch
        row["resumed_from_step"] = int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        row["resumed_from_step"] = f"unreadable: {e!r}"[:200]
    resume = command(args, table[task], attention, n, resumed, steps, [*extra, f"ckpt_path={ckpt}"], "32")
    rc, err = launch(resume, args, args.run_timeout)
    row["resumed_rc"] = rc
    if rc:
        row["error"] = err
    c_full, c_res = val_curve(full), val_curve(resumed)
    row["val_steps_full"] = sorted(c_full)
    row["val_steps_resumed"] = sorted(c_res)
    row["max_rel_diff"] = max_rel_diff(c_res, c_full)
    try:
        row["final_steps"] = json.loads((resumed / "results.json").read_text())["steps"]
    except (OSError, KeyError, ValueError):
        row["final_steps"] = None
    for d in (full, killed, resumed):
        drop_checkpoints(args, d)
    print(json.dumps(row)[:600], flush=True)
    return row


# -- report ------------------------------------------------------------------------------------------------------
def fmt(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    m, a = report["machine"], report["args"]
    lines = [f"# DDP scaling ({'CPU logic check: speeds mean nothing' if report['cpu'] else m.get('gpu', '?')})", "",
             f"{m['cuda_devices']} CUDA devices, torch {m['torch']}, commit {m['commit']}, "
             f"{a['steps']} steps per scaling run (tokens/s over the last {a['steps'] - a['warmup']})",
             "", "| task | attention | N | tokens/s | tokens/s per device | efficiency | peak MiB per device |",
             "|---|---|---|---|---|---|---|"]
    for r in report["scaling"]:
        lines.append(f"| {r['task']} | {r['attention']} | {r['devices']} | {fmt(r.get('tokens_per_sec'))} | "
                     f"{fmt(r.get('tokens_per_sec_per_device'))} | {fmt(r.get('efficiency'), '.2f')} | "
                     f"{fmt(r.get('peak_memory_mb_per_device'))} |" + (" FAILED" if "error" in r else ""))
    if report.get("equivalence"):
        lines += ["", "Equivalence: same global batch on 1 and 2 devices, dropout 0.", "",
                  "| task | attention | val steps | max rel. diff of val/loss |", "|---|---|---|---|"]
        for r in report["equivalence"]:
            lines.append(f"| {r['task']} | {r['attention']} | {len(r['val_steps'])}"
                         f"{'' if r['same_steps'] else ' (steps differ)'} | {fmt(r['max_rel_diff'], '.2e')} |"
                         + (" FAILED" if "error" in r else ""))
    if report.get("fault"):
        r = report["fault"]
        lines += ["", f"Fault: {r['task']} / {r['attention']} on {r['devices']} devices, SIGKILL (process group) "
                  f"{'mid-run' if r['killed_while_running'] else 'AFTER the run ended: not a test'}, resumed from "
                  f"last.ckpt at step {r['resumed_from_step']}, to step {r['final_steps']}: max rel. diff of val/loss "
                  f"against the uninterrupted run {fmt(r['max_rel_diff'], '.2e')} over steps "
                  f"{sorted(set(r['val_steps_full']) & set(r['val_steps_resumed']))}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(report["args"]["tasks"]), figsize=(5 * len(report["args"]["tasks"]), 3.6),
                             squeeze=False)
    for ax, task in zip(axes[0], report["args"]["tasks"]):
        for attention in report["args"]["attention"]:
            pts = sorted((r["devices"], r["tokens_per_sec_per_device"]) for r in report["scaling"]
                         if r["task"] == task and r["attention"] == attention and "tokens_per_sec_per_device" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=attention)
        ax.set_xlabel("devices"), ax.set_ylabel("tokens/s per device"), ax.set_title(task)
        ax.set_xticks(report["args"]["devices"]), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/ddp")
    ap.add_argument("--devices", default=None, help="comma list; default 1,2 (+4,8 where the GPUs exist)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--attention", default=",".join(ATTENTIONS))
    ap.add_argument("--steps", type=int, default=None, help="steps per scaling run (default 100 GPU, 8 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="steps before the timed window (default 20 GPU, 3 CPU)")
    ap.add_argument("--equivalence", action="store_true")
    ap.add_argument("--fault", action="store_true")
    ap.add_argument("--equiv-steps", type=int, default=None, help="default 300 GPU, 12 CPU")
    ap.add_argument("--val-every", type=int, default=None, help="default 50 GPU, 4 CPU")
    ap.add_argument("--val-batches", type=float, default=None, help="validation batches (default 20 GPU, 2 CPU)")
    ap.add_argument("--kill-delay", type=float, default=None, help="seconds after last.ckpt appears (2 GPU, 0.3 CPU)")
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--run-timeout", type=int, default=900)
    ap.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD, if git is here)")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--budget-s", type=float, default=540, help="start no run after this many seconds")
    ap.add_argument("--cpu", action="store_true", help="tiny, on the CPU with gloo: the logic check")
    args = ap.parse_args()

    import torch
    if not args.cpu and torch.cuda.device_count() < 1:
        sys.exit("no CUDA device: run with --cpu for the logic check, or on a GPU machine")
    if args.devices:
        args.devices = [int(d) for d in args.devices.split(",")]
    else:
        have = 2 if args.cpu else torch.cuda.device_count()
        args.devices = [d for d in (1, 2, 4, 8) if d <= max(have, 1)]
    if not args.cpu and max(args.devices) > torch.cuda.device_count():
        sys.exit(f"--devices {args.devices} but only {torch.cuda.device_count()} CUDA devices")
    defaults = dict(steps=(8, 100), warmup=(3, 20), equiv_steps=(12, 300), val_every=(4, 50), val_batches=(2, 20),
                    kill_delay=(0.3, 2.0))
    for k, (cpu, gpu) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, cpu if args.cpu else gpu)
    if args.val_batches == int(args.val_batches):
        args.val_batches = int(args.val_batches)
    args.tasks, args.attention = args.tasks.split(","), args.attention.split(",")

    global DEADLINE
    DEADLINE = time.time() + args.budget_s
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(args.commit), "cpu": args.cpu, "args": vars(args),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    report["scaling"] = [] if args.skip_scaling else scaling(args, out)
    save(report, out)
    if args.equivalence:
        report["equivalence"] = equivalence(args, out)
        save(report, out)
    if args.fault:
        report["fault"] = fault(args, out)
        save(report, out)
    plot(report, out / "ddp_scaling.png")
    print(markdown(report))


def save(report: dict, out: Path) -> None:
    for name, text in (("ddp_scaling.json", json.dumps(report, indent=2)), ("ddp_scaling.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


if __name__ == "__main__":
    main()
