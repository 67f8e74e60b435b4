"""Raw text -> a fairseq data-bin (``fairseq-preprocess``'s job, without fairseq).

    # translation / summarization: files {pref}.{src} and {pref}.{tgt}, line i of each is pair i
    python -m attnlab.tasks.preprocess --source-lang en --target-lang de \\
        --trainpref raw/train --validpref raw/valid --testpref raw/test --destdir data-bin \\
        --vocab-size 8000 --joined-dictionary
    # language modelling: files {pref} as they are, one example per line
    python -m attnlab.tasks.preprocess --only-source --trainpref raw/train.txt --validpref raw/valid.txt \\
        --testpref raw/test.txt --destdir data-bin --tokenizer none
    # a Hugging Face dataset saved with save_to_disk (needs `datasets`)
    python -m attnlab.tasks.preprocess --hf-dataset DIR --hf-fields translation.en,translation.de \\
        --source-lang en --target-lang de --destdir data-bin

Tokenization (``--tokenizer``): ``spm`` trains a sentencepiece model on the training text (both sides when
parallel; ``--spm-model FILE`` uses an existing one instead) and writes it to ``{destdir}/spm.model``; ``none``
takes the text as already tokenized (words, or BPE applied upstream) and splits on whitespace. The dictionary is
then built from the training tokens as fairseq does (by count, ``--threshold*``, ``--nwords*``, padded to a
multiple of ``--padding-factor``), followed by any sentencepiece piece the training text never produced (count 0:
a rare letter still gets an id). Sentencepiece normalises text (NFKC: ``…`` -> ``...``), so decoded ids give
the normalised text. Every line is encoded with eos appended (unknown tokens -> ``<unk>``) and
written as MMIDIDX. ``{destdir}/preprocess.json`` records the options and per-split counts, including
``post_process`` (what ``Dictionary.string`` needs to turn ids back into text). Output layout: see
``attnlab.tasks.fairseq_data``. Python callers use ``preprocess(destdir, splits, ...)`` (examples in memory) or
``run(argv)`` (the command line; returns what preprocess.json records).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from attnlab.io import atomic_write
from attnlab.tasks.fairseq_data import (Dictionary, IndexedDatasetBuilder, best_dtype, dict_path, split_prefix,
                                        tokenize_line)
from attnlab.tasks.text_sources import read_hf_dataset, read_lines, read_parallel


class Tokenizer:
    """Text -> tokens: sentencepiece pieces, or whitespace-split words (``model=None``)."""

    def __init__(self, model_bytes: bytes | None = None):
        self.model_bytes = model_bytes
        self.sp = None
        if model_bytes is not None:
            import sentencepiece as spm
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)

    def pieces(self) -> list[str]:
        """Every piece of the sentencepiece model except its control and unknown symbols."""
        if self.sp is None:
            return []
        return [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())
                if not (self.sp.is_control(i) or self.sp.is_unknown(i))]

    @property
    def post_process(self) -> str | None:
        return "sentencepiece" if self.sp is not None else None

    def __call__(self, lines: Sequence[str]) -> list[list[str]]:
        if self.sp is None:
            return [tokenize_line(line) for line in lines]
        return self.sp.encode(list(lines), out_type=str, num_threads=min(os.cpu_count() or 1, 16))


def train_sentencepiece(lines: Sequence[str], vocab_size: int, model_type: str = "unigram",
                        character_coverage: float = 1.0) -> bytes:
    """A sentencepiece model (serialized) over ``lines``. Its own specials are off except ``<unk>``: fairseq's
    dictionary supplies bos/pad/eos, and the pieces are words of that dictionary."""
    import sentencepiece as spm
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError("no non-empty training lines to train sentencepiece on")
    longest = max(len(line.encode("utf-8")) for line in lines)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, hard_vocab_limit=False,
        max_sentence_length=max(4192, longest + 1),  # long documents (summarization) are kept, not skipped
        input_sentence_size=2_000_000, shuffle_input_sentence=True,
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, num_threads=min(os.cpu_count() or 1, 16),
        minloglevel=2)
    return model.getvalue()


def _binarize(prefix: Path, token_lists: list[list[str]], d: Dictionary) -> dict:
    builder = IndexedDatasetBuilder(prefix, best_dtype(len(d)))
    n_tok = n_unk = 0
    index, unk, eos = d.indices, d.unk(), d.eos()
    try:
        for tokens in token_lists:  # Dictionary.encode_line's rule, without a tensor per line (1.5M-token corpora)
            ids = [index.get(w, unk) for w in tokens]
            n_unk += ids.count(unk)
            ids.append(eos)
            n_tok += len(ids)
            builder.add_item(np.asarray(ids, dtype=np.int64))
        builder.end_document()
        builder.finalize()
    except BaseException:
        builder.abort()
        raise
    return {"sequences": len(token_lists), "tokens": n_tok, "unk": n_unk}


def preprocess(destdir: str | os.PathLike, splits: dict[str, list], src: str | None = None, tgt: str | None = None,
               tokenizer: str = "spm", spm_model: str | os.PathLike | None = None, vocab_size: int = 8000,
               spm_type: str = "unigram", character_coverage: float = 1.0, joined_dictionary: bool = False,
               threshold_src: int = 0, threshold_tgt: int = 0, nwords_src: int = -1, nwords_tgt: int = -1,
               padding_factor: int = 8, log=print) -> dict:
    """Binarize ``splits`` ({"train": examples, "valid": ..., ...}; an example is a string, or a (src, tgt) pair
    when ``src``/``tgt`` are given) into ``destdir``. Returns what preprocess.json records."""
    parallel = src is not None
    if parallel and (tgt is None or src == tgt):
        raise ValueError(f"source {src!r} and target {tgt!r}: a parallel corpus needs two different languages")
    if "train" not in splits or not splits["train"]:
        raise ValueError("the train split is required (the dictionary and the sentencepiece model come from it)")
    destdir = Path(destdir)
    destdir.mkdir(parents=True, exist_ok=True)
    langs = [src, tgt] if parallel else [None]
    sides = {}  # (split, lang) -> lines
    for split, examples in splits.items():
        for k, lang in enumerate(langs):
            sides[split, lang] = [ex[k] for ex in examples] if parallel else list(examples)

    if tokenizer == "spm":
        if spm_model is not None:
            model = Path(spm_model).read_bytes()
            log(f"sentencepiece model: {spm_model}")
        else:
            train_text = [line for lang in langs for line in sides["train", lang]]
            log(f"training sentencepiece ({spm_type}, vocab {vocab_size}) on {len(train_text)} lines")
            model = train_sentencepiece(train_text, vocab_size, spm_type, character_coverage)
        atomic_write(destdir / "spm.model", model)
        tok = Tokenizer(model)
    elif tokenizer == "none":
        if spm_model is not None:
            raise ValueError("spm_model given with tokenizer='none': pass tokenizer='spm' to apply it")
        (destdir / "spm.model").unlink(missing_ok=True)  # a stale model would say the text is sentencepiece'd
        tok = Tokenizer(None)
    else:
        raise ValueError(f"tokenizer={tokenizer!r}: expected 'spm' or 'none'")

    tokens = {key: tok(lines) for key, lines in sides.items()}
    thresholds = {src: threshold_src, tgt: threshold_tgt} if parallel else {None: threshold_src}
    nwords = {src: nwords_src, tgt: nwords_tgt} if parallel else {None: nwords_src}
    dicts = {}
    if parallel and joined_dictionary:
        joint = Dictionary.build([t for lang in langs for t in tokens["train", lang]], threshold_src, nwords_src,
                                 padding_factor, tok.pieces())
        dicts = {src: joint, tgt: joint}
    else:
        for lang in langs:
            dicts[lang] = Dictionary.build(tokens["train", lang], thresholds[lang], nwords[lang], padding_factor,
                                           tok.pieces())
    for lang in langs:
        dicts[lang].save(dict_path(destdir, lang))
        log(f"dictionary {dict_path(destdir, lang).name}: {len(dicts[lang])} symbols")

    stats = {}
    for split in splits:
        stats[split] = {}
        for lang in langs:
            prefix = split_prefix(destdir, split, src, tgt, lang)
            s = _binarize(prefix, tokens[split, lang], dicts[lang])
            stats[split][lang or "text"] = s
            log(f"{prefix.name}: {s['sequences']} sequences, {s['tokens']} tokens, "
                f"{100.0 * s['unk'] / max(s['tokens'], 1):.2f}% replaced by <unk>")
    meta = {"source_lang": src, "target_lang": tgt, "tokenizer": tokenizer, "post_process": tok.post_process,
            "vocab_size": {lang or "text": len(d) for lang, d in dicts.items()},
            "joined_dictionary": bool(parallel and joined_dictionary), "splits": stats}
    atomic_write(destdir / "preprocess.json", json.dumps(meta, indent=1))
    return meta


def _split_names(args) -> list[tuple[str, str]]:
    """(split name, prefix): fairseq's naming, extra comma-separated valid/test prefixes become valid1, test1..."""
    out = [("train", args.trainpref)]
    for name, prefs in (("valid", args.validpref), ("test", args.testpref)):
        for k, p in enumerate(prefs.split(",") if prefs else []):
            out.append((name if k == 0 else f"{name}{k}", p))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab-preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--destdir", required=True, help="the data-bin directory to write")
    p.add_argument("-s", "--source-lang", help="source language suffix (parallel data)")
    p.add_argument("-t", "--target-lang", help="target language suffix (parallel data)")
    p.add_argument("--only-source", action="store_true", help="monolingual (language modelling) data")
    p.add_argument("--trainpref", help="train file prefix ({pref}.{lang}; monolingual: the file itself)")
    p.add_argument("--validpref", help="valid prefix(es), comma separated")
    p.add_argument("--testpref", help="test prefix(es), comma separated")
    p.add_argument("--hf-dataset", help="a Hugging Face dataset directory (save_to_disk) instead of text files")
    p.add_argument("--hf-fields", help="its text field(s), comma separated: src,tgt (or one for monolingual)")
    p.add_argument("--hf-splits", default="train:train,validation:valid,test:test",
                   help="hf_split:our_split pairs (default %(default)s); missing hf splits are skipped")
    p.add_argument("--tokenizer", choices=["spm", "none"], default="spm",
                   help="spm: sentencepiece (trained unless --spm-model); none: text is already tokenized")
    p.add_argument("--spm-model", help="an existing sentencepiece .model to apply")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size when training")
    p.add_argument("--spm-type", choices=["unigram", "bpe", "char", "word"], default="unigram")
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--joined-dictionary", action="store_true", help="one dictionary for source and target")
    p.add_argument("--thresholdsrc", type=int, default=0, help="drop source tokens seen fewer times in train")
    p.add_argument("--thresholdtgt", type=int, default=0)
    p.add_argument("--nwordssrc", type=int, default=-1, help="cap the source dictionary size (-1: no cap)")
    p.add_argument("--nwordstgt", type=int, default=-1)
    p.add_argument("--padding-factor", type=int, default=8)
    return p


def run(argv: list[str] | None = None) -> dict:
    """The command line as a function: returns what was built (preprocess.json / corpus.json contents)."""
    args = build_parser().parse_args(argv)
    src, tgt = args.source_lang, args.target_lang
    parallel = not args.only_source
    if parallel and not (src and tgt):
        raise SystemExit("parallel data needs --source-lang and --target-lang (or --only-source for monolingual)")
    if not parallel:
        if tgt:
            raise SystemExit("--only-source takes no --target-lang")
    splits: dict[str, list] = {}
    if args.hf_dataset:
        fields = (args.hf_fields or "").split(",")
        if len(fields) != (2 if parallel else 1) or not all(fields):
            raise SystemExit(f"--hf-fields needs {'two fields (src,tgt)' if parallel else 'one field'}")
        mapping = dict(pair.split(":") for pair in args.hf_splits.split(","))
        for name, rows in read_hf_dataset(args.hf_dataset, fields, mapping).items():
            splits[name] = rows if parallel else [r[0] for r in rows]
    else:
        if not args.trainpref:
            raise SystemExit("--trainpref is required (or --hf-dataset)")
        for name, pref in _split_names(args):
            if parallel:
                splits[name] = read_parallel(f"{pref}.{src}", f"{pref}.{tgt}")
            else:
                splits[name] = read_lines(f"{pref}.{src}" if src else pref)
    if not parallel:
        src = None
    return preprocess(args.destdir, splits, src, tgt, tokenizer=args.tokenizer, spm_model=args.spm_model,
                      vocab_size=args.vocab_size, spm_type=args.spm_type,
                      character_coverage=args.character_coverage, joined_dictionary=args.joined_dictionary,
                      threshold_src=args.thresholdsrc, threshold_tgt=args.thresholdtgt, nwords_src=args.nwordssrc,
                      nwords_tgt=args.nwordstgt, padding_factor=args.padding_factor)


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0  # the console script exits with this; run() returns the counts for Python callers


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
