"""Translate (or summarize) a file or stdin with a trained seq2seq checkpoint.

    python -m attnlab.generate outputs/DATE/TIME/checkpoints/last.ckpt --input news.en --output news.de
    echo "Open the family tree" | python -m attnlab.generate CKPT --beam 5 --lenpen 1.0
    python -m attnlab.generate CKPT --input x.en attention.decoder.name=softmax   # config overrides at the end

The run's composed config (``<run dir>/.hydra/config.yaml``, found above the checkpoint, or ``--config``) rebuilds
the datamodule (its dictionary and sentencepiece model encode the input as the training data were) and the network;
the weights load with ``weights_only=True``. One line in, one detokenized line out, in input order. Decoding is the
test-time ``model.generation`` of the run unless ``--beam`` / ``--greedy`` / ``--lenpen`` / ``--max-len-a/b`` say
otherwise. A line longer than the model's source positions is an error naming the line (nothing is truncated).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from .io import atomic_write
from .train import net_config


def find_config(ckpt: Path) -> Path:
    for d in [ckpt.parent, *ckpt.parents]:
        if (d / ".hydra" / "config.yaml").is_file():
            return d / ".hydra" / "config.yaml"
    raise FileNotFoundError(f"no .hydra/config.yaml above {ckpt}; pass the run's config with --config")


def load_model(ckpt: Path, config: Path | None = None, overrides: list[str] = (), device: str = "cpu"):
    """(module, datamodule) of a run, with the checkpoint's weights, in eval mode."""
    cfg = OmegaConf.load(config or find_config(ckpt))
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    datamodule = hydra.utils.instantiate(cfg.task)
    if getattr(datamodule, "batch_kind", None) != "seq2seq":
        raise ValueError(f"{ckpt}: generate translates with seq2seq models; this run's task is "
                         f"{cfg.task._target_} ({getattr(datamodule, 'batch_kind', None)!r} batches)")
    net = hydra.utils.instantiate(net_config(cfg, datamodule))
    model_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "net"}
    module = hydra.utils.instantiate(model_cfg, net=net, _recursive_=False, _convert_="all")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    return module.to(device).eval(), datamodule


def translate_lines(module, datamodule, lines: list[str], gen: dict, batch_size: int = 32,
                    device: str = "cpu") -> list[str]:
    pad = datamodule.special_ids["pad"]
    encoded = [datamodule.encode_source(line) for line in lines]
    limit = module.net.max_source_len
    for i, ids in enumerate(encoded):
        if len(ids) > limit:
            raise ValueError(f"input line {i + 1} has {len(ids)} tokens, more than the model's {limit} source "
                             "positions; split or shorten it")
    order = sorted(range(len(lines)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    out: list[str] = [""] * len(lines)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        S = max(len(encoded[i]) for i in idx)
        src = torch.full((len(idx), S), pad, dtype=torch.long)
        for b, i in enumerate(idx):
            src[b, : len(encoded[i])] = encoded[i]
        mask = src == pad
        hyps = module.translate(src.to(device), mask.to(device), datamodule.special_ids, gen)
        for i, h in zip(idx, hyps):
            out[i] = datamodule.decode(h)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnlab.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("overrides", nargs="*", help="config overrides (key=value), applied to the run's config")
    p.add_argument("--input", default="-", help="a text file, one sentence per line (default: stdin)")
    p.add_argument("--output", default="-", help="where to write (default: stdout)")
    p.add_argument("--config", type=Path, help="the run's .hydra/config.yaml (default: found above the checkpoint)")
    p.add_argument("--beam", type=int, help="beam size")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
    p.add_argument("--lenpen", type=float)
    p.add_argument("--max-len-a", type=float)
    p.add_argument("--max-len-b", type=int)
    p.add_argument("--min-len", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    module, dm = load_model(args.checkpoint, args.config, args.overrides, args.device)
    gen = {k: v for k, v in {"beam": args.beam, "lenpen": args.lenpen, "max_len_a": args.max_len_a,
                             "max_len_b": args.max_len_b, "min_len": args.min_len}.items() if v is not None}
    if args.greedy:
        gen["mode"] = "greedy"
    elif args.beam is not None:
        gen["mode"] = "beam"
    text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = translate_lines(module, dm, lines, gen, args.batch_size, args.device)
    result = "".join(line + "\n" for line in out)
    if args.output == "-":
        sys.stdout.write(result)
    else:
        atomic_write(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
