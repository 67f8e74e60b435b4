"""Average the weights of the last N checkpoints (fairseq's ``scripts/average_checkpoints.py``, for Lightning).

    python -m attnlab.average_checkpoints outputs/DATE/TIME/checkpoints --num-last 5 --output avg.ckpt
    python -m attnlab.average_checkpoints a.ckpt b.ckpt c.ckpt --output avg.ckpt
    python train.py task=wmt train=false ckpt_path=avg.ckpt      # test the average

A run keeps only its best and last checkpoint by default; to average, keep periodic ones:
``callbacks.model_checkpoint.save_top_k=-1 +callbacks.model_checkpoint.every_n_train_steps=1000``.

Checkpoints are ordered by their ``global_step`` (``last.ckpt`` and the step file it duplicates count once); the
floating-point tensors of ``state_dict`` are averaged in float64 and cast back; other tensors (counters) must agree
and are copied. The output is the newest checkpoint with the averaged ``state_dict`` and without optimizer state
(so it evaluates, and fine-tunes from fresh optimizer state), written atomically. Files are loaded with
``weights_only=True``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .io import atomic_write


def _load(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in ckpt:
        raise ValueError(f"{path}: no state_dict; not a Lightning checkpoint of attnlab")
    return ckpt


def select(paths: list[Path], num_last: int | None) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints to average, oldest first; a directory stands for its *.ckpt files."""
    files = []
    for p in paths:
        files += sorted(p.glob("*.ckpt")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .ckpt files in {[str(p) for p in paths]}")
    by_step: dict[int, Path] = {}
    for f in files:
        step = int(torch.load(f, map_location="cpu", weights_only=True).get("global_step", -1))
        if step not in by_step or by_step[step].name == "last.ckpt":  # prefer the step file over its last.ckpt copy
            by_step[step] = f
    chosen = sorted(by_step.items())
    if num_last is not None:
        if num_last < 1:
            raise ValueError(f"--num-last must be >= 1, got {num_last}")
        if num_last > len(chosen):
            raise ValueError(f"--num-last {num_last} but only {len(chosen)} distinct checkpoints (steps "
                             f"{[s for s, _ in chosen]}). Fix: keep more (callbacks.model_checkpoint.save_top_k=-1 "
                             f"with every_n_train_steps) or average fewer")
        chosen = chosen[-num_last:]
    return chosen


def average(paths: list[Path]) -> dict:
    """The newest checkpoint (last of ``paths``) with the mean state_dict of all of them."""
    sums, newest, first_keys = None, None, None
    for p in paths:
        ckpt = _load(p)
        sd = ckpt["state_dict"]
        if sums is None:
            first_keys = list(sd)
            sums = {k: (v.double().clone() if v.is_floating_point() else v.clone()) for k, v in sd.items()}
        else:
            if set(sd) != set(first_keys):
                raise ValueError(f"{p}: its parameters differ from {paths[0]}'s (keys "
                                 f"{sorted(set(sd) ^ set(first_keys))[:5]}): checkpoints of different models")
            for k, v in sd.items():
                if v.shape != sums[k].shape:
                    raise ValueError(f"{p}: {k} has shape {tuple(v.shape)}, {tuple(sums[k].shape)} in {paths[0]}")
                if v.is_floating_point():
                    sums[k] += v.double()
                elif not torch.equal(v, sums[k]):
                    raise ValueError(f"{p}: non-float tensor {k} differs between checkpoints; cannot average")
        newest = ckpt
    n = len(paths)
    ref = newest["state_dict"]
    newest["state_dict"] = {k: (sums[k] / n).to(ref[k].dtype) if ref[k].is_floating_point() else ref[k]
                            for k in first_keys}
    for key in ("optimizer_states", "lr_schedulers"):
        newest.pop(key, None)
    newest["averaged_from"] = [str(p) for p in paths]
    return newest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnlab.average_checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="checkpoint files, or a checkpoints/ directory")
    p.add_argument("--num-last", type=int, default=None, help="average the last N (by step); default: all")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    chosen = select(args.inputs, args.num_last)
    averaged = average([f for _, f in chosen])
    atomic_write(args.output, lambda f: torch.save(averaged, f))
    print(f"averaged {len(chosen)} checkpoints (steps {[s for s, _ in chosen]}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
