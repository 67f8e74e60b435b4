"""Readers of raw text for preprocess: one example per line, parallel line files, Hugging Face datasets on disk.

- ``read_lines(path)``: the lines of a UTF-8 file, newline stripped (an empty line is an example too: fairseq keeps
  it, and dropping it would shift every later pair).
- ``read_parallel(src_path, tgt_path)``: ``(src, tgt)`` line pairs; files of different lengths are an error.
- ``read_hf_dataset(path, fields, splits)``: a ``datasets.Dataset``/``DatasetDict`` saved with ``save_to_disk``
  -> {split: rows}; ``fields`` are column names, dotted for nested ones (``translation.en``). Needs ``datasets``
  (optional: this is the only place that imports it, and only when called).
- ``write_lines(path, lines)``: the inverse of ``read_lines``, atomic; newlines inside an example become spaces.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from attnlab.io import atomic_write
from attnlab.tasks.fairseq_data import DataFormatError


def read_lines(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file (one example per line, UTF-8)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 ({e}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start an empty one
    return [line.rstrip("\r") for line in lines]


def read_parallel(src_path: str | os.PathLike, tgt_path: str | os.PathLike) -> list[tuple[str, str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataFormatError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: line i of each must "
                              "be the two sides of pair i")
    return list(zip(src, tgt))


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> int:
    out = [" ".join(str(line).split("\n")).replace("\r", " ") for line in lines]
    atomic_write(path, "".join(line + "\n" for line in out))
    return len(out)


def _field(row: dict, name: str):
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def _rows(ds, path, fields) -> list[tuple[str, ...]]:
    out = []
    for i, row in enumerate(ds):
        try:
            out.append(tuple(str(_field(row, f)) for f in fields))
        except KeyError as e:
            raise KeyError(f"{path}: row {i} has no field {e.args[0]!r} (columns: {ds.column_names}); name the "
                           "fields with --hf-fields, dotted for nested ones (translation.en)") from None
    return out


def read_hf_dataset(path: str | os.PathLike, fields: Sequence[str],
                    splits: dict[str, str] | None = None) -> dict[str, list[tuple[str, ...]]]:
    """A dataset saved with ``save_to_disk`` -> {our split: rows}, a row being the tuple of the named fields.

    ``splits`` maps the dataset's split names to ours (default train/validation/test -> train/valid/test; splits
    the dataset lacks are skipped); a single ``Dataset`` (no splits) becomes ``train``."""
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a Hugging Face dataset needs the `datasets` package: pip install datasets "
                          "(or export the text to one-example-per-line files and pass those)") from None
    ds = datasets.load_from_disk(str(path))
    if not isinstance(ds, datasets.DatasetDict):
        return {"train": _rows(ds, path, fields)}
    splits = splits or {"train": "train", "validation": "valid", "test": "test"}
    out = {ours: _rows(ds[theirs], path, fields) for theirs, ours in splits.items() if theirs in ds}
    if "train" not in out:
        raise KeyError(f"{path}: none of its splits {sorted(ds)} maps to train (mapping {splits})")
    return out
