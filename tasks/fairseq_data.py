"""fairseq binarized data, read and written without fairseq (it does not import on Python >= 3.11).

A data-bin directory, as ``fairseq-preprocess`` (or ``python -m attnlab.tasks.preprocess``) writes it::

    dict.{src}.txt  dict.{tgt}.txt           translation / summarization (identical files when the vocab is joint)
    {split}.{src}-{tgt}.{src}.bin/.idx       the source side of split ``train`` / ``valid`` / ``test``
    {split}.{src}-{tgt}.{tgt}.bin/.idx       the target side; sample i of both is one pair
    dict.txt  {split}.bin/.idx               language modelling (monolingual): one line of text per sample
    spm.model                                the sentencepiece model, when preprocess tokenized with one

Public API (the datamodules build on these):

- ``Dictionary``: symbols <-> ids. ``bos()=0, pad()=1, eos()=2, unk()=3`` (fairseq's order), ``len(d)``,
  ``d[i]``, ``d.index(word)``, ``encode_line(line) -> 1-D int64 tensor`` (ends in eos; unknown words -> unk),
  ``string(ids, post_process=None|"sentencepiece"|"subword_nmt")`` (drops bos/eos/pad), ``Dictionary.load(path)``,
  ``d.save(path)``, ``Dictionary.build(token_lists, threshold, nwords, padding_factor)``.
- ``IndexedDataset`` (``load_indexed_dataset(prefix, dictionary=None)``): ``ds[i]`` is a 1-D int64 tensor,
  ``ds.sizes`` a numpy int array of the lengths, ``len(ds)``, ``ds.doc_idx`` (Megatron's layout only, else None).
  Reads the memory-mapped ``MMIDIDX`` format and the
  legacy ``TNTIDX`` (``--dataset-impl cached/lazy``) one; given the dictionary it checks every id is < len(dict).
- ``IndexedDatasetBuilder(prefix, dtype)``: ``add_item(ids)``, ``finalize()`` -> MMIDIDX (``best_dtype(len(d))``).
- ``load_parallel(data_dir, split, src, tgt)``, ``load_monolingual(data_dir, split)``: the datasets and
  dictionaries of one split, checked against each other.

Byte layouts (little endian). MMIDIDX ``.idx`` as fairseq writes it: ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` = 1,
dtype code ``<B``, ``<Q`` number of sequences N, N int32 sizes, N int64 byte offsets into ``.bin``. Megatron-LM's
variant (also read; written with ``doc_index=True``) has a ``<Q`` document count D after N and D int64 document
boundaries (0, ..., N) at the end; the file length tells the two apart. ``.bin``: the sequences back to back.
TNTIDX ``.idx`` (``--dataset-impl lazy/cached``): ``b"TNTIDX\\x00\\x00"``, version ``<Q`` = 1, ``<QQ`` dtype code
and element size, ``<QQ`` N and S (number of size entries), N+1 int64 dim offsets, N+1 int64 data offsets (in
elements), S int64 sizes; fairseq's writer stores each id + 1 (Lua's 1-based ids), so the reader subtracts 1.
dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6/7 float64, 8 uint16, 9 uint32, 10 uint64.
"""
from __future__ import annotations

import os
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from attnlab.io import atomic_write

MMAP_MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"
CODE_TO_DTYPE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
                 8: np.uint16, 9: np.uint32, 10: np.uint64}
DTYPE_TO_CODE = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
                 np.dtype(np.int64): 5, np.dtype(np.uint16): 8, np.dtype(np.uint32): 9, np.dtype(np.uint64): 10}
OVERWRITE_FLAG = "#fairseq:overwrite"
_SPACE = re.compile(r"\s+")


class DataFormatError(ValueError):
    """A data file that cannot be read as it stands; the message names the file and the fix."""


def tokenize_line(line: str) -> list[str]:
    """fairseq's default tokenizer: split on runs of whitespace."""
    return _SPACE.sub(" ", line).strip().split()


def undo_subwords(text: str, kind: str | None) -> str:
    """Undo a subword segmentation on a detokenized id string (fairseq's ``--post-process``)."""
    if kind in (None, "none"):
        return text
    if kind == "sentencepiece":
        return text.replace(" ", "").replace("\u2581", " ").strip()
    if kind == "subword_nmt":
        return (text + " ").replace("@@ ", "").rstrip()
    raise ValueError(f"post_process={kind!r}: expected None, 'sentencepiece' or 'subword_nmt'")


class Dictionary:
    """fairseq's symbol table: the four specials at ids 0..3, then the symbols of ``dict.txt`` in file order.

    ``dict.txt`` has one ``<symbol> <count>`` line per symbol (specials are not written; they are implicit). A
    symbol already present is an error unless its line ends with ``#fairseq:overwrite``; then, as in fairseq,
    the symbol gets a new id at that position and the word maps to it (the old slot stays, unreachable).
    """

    def __init__(self, bos: str = "<s>", pad: str = "<pad>", eos: str = "</s>", unk: str = "<unk>"):
        self.bos_word, self.pad_word, self.eos_word, self.unk_word = bos, pad, eos, unk
        self.symbols: list[str] = []
        self.count: list[int] = []
        self.indices: dict[str, int] = {}
        self.bos_index = self.add_symbol(bos)
        self.pad_index = self.add_symbol(pad)
        self.eos_index = self.add_symbol(eos)
        self.unk_index = self.add_symbol(unk)
        self.nspecial = len(self.symbols)

    # ids and symbols
    def bos(self) -> int:
        return self.bos_index

    def pad(self) -> int:
        return self.pad_index

    def eos(self) -> int:
        return self.eos_index

    def unk(self) -> int:
        return self.unk_index

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other) -> bool:
        return isinstance(other, Dictionary) and self.symbols == other.symbols and self.indices == other.indices

    def __contains__(self, word: str) -> bool:
        return word in self.indices

    def __getitem__(self, idx: int) -> str:
        if not 0 <= idx < len(self.symbols):
            raise IndexError(f"id {idx} is outside the dictionary (size {len(self.symbols)}): the ids come from "
                             "another dictionary")
        return self.symbols[idx]

    def index(self, word: str) -> int:
        return self.indices.get(word, self.unk_index)

    def add_symbol(self, word: str, n: int = 1, overwrite: bool = False) -> int:
        if word in self.indices and not overwrite:
            idx = self.indices[word]
            self.count[idx] += n
            return idx
        idx = len(self.symbols)
        self.indices[word] = idx
        self.symbols.append(word)
        self.count.append(n)
        return idx

    # text <-> ids
    def encode_line(self, line: str | Sequence[str], append_eos: bool = True,
                    add_if_not_exist: bool = False) -> torch.Tensor:
        """Whitespace-split ``line`` (or take a token list) to a 1-D int64 tensor; unknown words -> ``unk()``.

        ``add_if_not_exist=True`` grows the dictionary instead (fairseq's default; here opt-in so that encoding
        validation text can never change the vocabulary by accident).
        """
        words = tokenize_line(line) if isinstance(line, str) else list(line)
        ids = [self.add_symbol(w) if add_if_not_exist else self.index(w) for w in words]
        if append_eos:
            ids.append(self.eos_index)
        return torch.tensor(ids, dtype=torch.long)

    def string(self, ids, post_process: str | None = None, unk_string: str | None = None,
               include_eos: bool = False) -> str:
        """Ids (tensor, array, list; 1-D, or 2-D for one line per row) -> text. bos and pad are dropped, eos too
        unless ``include_eos``; ``post_process="sentencepiece"`` joins the pieces back into words."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return "\n".join(self.string(row, post_process, unk_string, include_eos) for row in ids)
        skip = {self.bos_index, self.pad_index} | (set() if include_eos else {self.eos_index})
        words = [(unk_string or self.unk_word) if i == self.unk_index else self[i] for i in ids if i not in skip]
        return undo_subwords(" ".join(words), post_process)

    # files
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Dictionary":
        d = cls()
        d.add_from_file(path)
        return d

    def add_from_file(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no dictionary there; a data-bin directory needs the dict*.txt that "
                                    "preprocess wrote beside the .bin/.idx files")
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n").rstrip()
                if not line:
                    continue
                try:
                    word, field = line.rsplit(" ", 1)
                    overwrite = field == OVERWRITE_FLAG
                    if overwrite:
                        word, field = word.rsplit(" ", 1)
                    count = int(field)
                except ValueError:
                    raise DataFormatError(f"{path}:{lineno}: {line!r} is not '<symbol> <count> [{OVERWRITE_FLAG}]'; "
                                          "fix or regenerate the dictionary") from None
                if word in self.indices and not overwrite:
                    raise DataFormatError(f"{path}:{lineno}: duplicate symbol {word!r}; remove the line, or end it "
                                          f"with '{OVERWRITE_FLAG}' to give the symbol a new id")
                self.add_symbol(word, n=count, overwrite=overwrite)

    def save(self, path: str | os.PathLike) -> None:
        lines = [f"{w} {c}\n" for w, c in zip(self.symbols[self.nspecial:], self.count[self.nspecial:])]
        atomic_write(path, "".join(lines))

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], threshold: int = -1, nwords: int = -1,
              padding_factor: int = 8, extra_symbols: Sequence[str] = ()) -> "Dictionary":
        """fairseq-preprocess's dictionary: symbols by count (ties alphabetical), those seen < ``threshold``
        times dropped, at most ``nwords`` entries in all (-1: no cap), padded with ``madeupwordNNNN`` (count 0)
        to a multiple of ``padding_factor``. ``extra_symbols`` not yet in it follow the counted ones with count 0
        (within the ``nwords`` cap): a sentencepiece vocabulary, so that pieces the training text never used
        alone (a rare letter) still have an id instead of turning into <unk>."""
        counts = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        d = cls()
        for special in (d.bos_word, d.pad_word, d.eos_word, d.unk_word):
            counts.pop(special, None)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if nwords > 0:
            ranked = ranked[: max(nwords - d.nspecial, 0)]
        for word, c in ranked:
            if c >= threshold:
                d.add_symbol(word, n=c)
        for word in extra_symbols:
            if word not in d and (nwords <= 0 or len(d) < nwords):
                d.add_symbol(word, n=0)
        i = 0
        while padding_factor > 1 and len(d) % padding_factor:
            d.add_symbol(f"madeupword{i:04d}", n=0)
            i += 1
        return d


# --- indexed datasets --------------------------------------------------------------------------------------------

def _int_dtype(code: int, path: Path) -> np.dtype:
    if code not in CODE_TO_DTYPE:
        raise DataFormatError(f"{path}: unknown dtype code {code} (known: {sorted(CODE_TO_DTYPE)}); the file is "
                              "corrupt or not a fairseq index: regenerate it with preprocess")
    dtype = np.dtype(CODE_TO_DTYPE[code])
    if dtype.kind == "f":
        raise DataFormatError(f"{path}: dtype code {code} is floating point ({dtype}); token data must be integer "
                              "ids: this is not a token dataset")
    return dtype


class IndexedDataset(torch.utils.data.Dataset):
    """One binarized split: ``ds[i]`` is a 1-D int64 tensor, ``ds.sizes`` its lengths (numpy int64).

    Reads MMIDIDX (``.bin`` memory-mapped, nothing loaded up front) or legacy TNTIDX; the constructor checks that
    the index and the data agree so that a truncated or mismatched pair fails here, not mid-epoch.
    """

    def __init__(self, prefix: str | os.PathLike, fix_lua_indexing: bool = True):
        self.prefix = str(prefix)
        self.offset = 0  # subtracted from stored values: fairseq's legacy writer stores id + 1 (Lua's 1-based ids)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing; a binarized split is a .bin/.idx pair with the same prefix "
                                        "(run `python -m attnlab.tasks.preprocess` to write one)")
        raw = idx_path.read_bytes()
        if raw.startswith(MMAP_MAGIC):
            self.format = "mmap"
            self._read_mmap_index(raw, idx_path)
        elif raw.startswith(LEGACY_MAGIC):
            self.format = "legacy"
            self._read_legacy_index(raw, idx_path)
            self.offset = 1 if fix_lua_indexing else 0
        else:
            raise DataFormatError(f"{idx_path}: starts with {raw[:9]!r}, neither {MMAP_MAGIC!r} (mmap) nor "
                                  f"{LEGACY_MAGIC!r} (cached/lazy); a raw-text split (--dataset-impl raw) or another "
                                  "file: re-binarize it with preprocess")
        nbytes = bin_path.stat().st_size
        expected = int(self._ends[-1]) * self.dtype.itemsize if len(self._ends) else 0
        if nbytes != expected:
            raise DataFormatError(f"{bin_path}: {nbytes} bytes, but {idx_path} describes {expected} "
                                  f"({len(self)} sequences of {self.dtype}); the two files are from different runs or "
                                  "one is truncated: re-run preprocess for this split")
        self._map()

    def _map(self) -> None:
        bin_path = self.prefix + ".bin"
        # np.memmap cannot map an empty file
        self._data = (np.memmap(bin_path, dtype=self.dtype, mode="r") if len(self.sizes)
                      and os.path.getsize(bin_path) else np.zeros(0, dtype=self.dtype))

    def __getstate__(self) -> dict:
        # DataLoader workers started with "spawn" get the index and re-map the file, not a copy of all the tokens
        return {k: v for k, v in self.__dict__.items() if k != "_data"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()

    def _read_mmap_index(self, raw: bytes, path: Path) -> None:
        head = 9 + 8 + 1 + 8  # magic, version, dtype code, N: fairseq's header
        if len(raw) < head:
            raise DataFormatError(f"{path}: {len(raw)} bytes, shorter than the {head}-byte MMIDIDX header: truncated; "
                                  "re-run preprocess")
        (version,) = struct.unpack_from("<Q", raw, 9)
        if version != 1:
            raise DataFormatError(f"{path}: MMIDIDX version {version}, only version 1 exists; not a fairseq index")
        (code,) = struct.unpack_from("<B", raw, 17)
        self.dtype = _int_dtype(code, path)
        (n,) = struct.unpack_from("<Q", raw, 18)
        # fairseq: N sizes + N pointers follow. Megatron's variant puts a document count D after N and D document
        # boundaries at the end. The file length tells them apart (they could only coincide with D = -1).
        ndoc = None
        if len(raw) != head + 12 * n:
            n_meg, ndoc = struct.unpack_from("<QQ", raw, 18) if len(raw) >= head + 8 else (n, 0)
            if len(raw) != head + 8 + 12 * n_meg + 8 * ndoc:
                raise DataFormatError(
                    f"{path}: {len(raw)} bytes, but its header ({n} sequences) needs {head + 12 * n} (fairseq layout) "
                    f"or, read as Megatron's layout with document index, {head + 8 + 12 * n_meg + 8 * ndoc}: "
                    "truncated or corrupt; re-run preprocess")
            head += 8
        self.layout = "fairseq" if ndoc is None else "megatron"
        self.sizes = np.frombuffer(raw, np.int32, n, head).astype(np.int64)
        pointers = np.frombuffer(raw, np.int64, n, head + 4 * n)
        self.doc_idx = None if ndoc is None else np.frombuffer(raw, np.int64, ndoc, head + 12 * n).copy()
        if (self.sizes < 0).any():
            raise DataFormatError(f"{path}: negative sequence sizes: corrupt; re-run preprocess")
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]) if n else np.zeros(0, np.int64)
        if not np.array_equal(pointers, starts * self.dtype.itemsize):
            raise DataFormatError(f"{path}: byte offsets do not follow from the sizes (sequences not stored back to "
                                  "back): corrupt index; re-run preprocess")
        if ndoc and (self.doc_idx[0] != 0 or self.doc_idx[-1] != n or (np.diff(self.doc_idx) < 0).any()):
            raise DataFormatError(f"{path}: document index is not a non-decreasing 0..{n} sequence: corrupt; "
                                  "re-run preprocess")
        self._starts = starts
        self._ends = starts + self.sizes

    def _read_legacy_index(self, raw: bytes, path: Path) -> None:
        head = 8 + 8 + 16 + 16
        if len(raw) < head:
            raise DataFormatError(f"{path}: {len(raw)} bytes, shorter than the {head}-byte TNTIDX header: truncated")
        (version,) = struct.unpack_from("<Q", raw, 8)
        if version != 1:
            raise DataFormatError(f"{path}: TNTIDX version {version}, only version 1 exists; not a fairseq index")
        code, elsize = struct.unpack_from("<QQ", raw, 16)
        self.dtype = _int_dtype(code, path)
        if elsize != self.dtype.itemsize:
            raise DataFormatError(f"{path}: element size {elsize} disagrees with dtype code {code} "
                                  f"({self.dtype}, {self.dtype.itemsize} bytes): corrupt index")
        n, s = struct.unpack_from("<QQ", raw, 32)
        need = head + 8 * (2 * (n + 1) + s)
        if len(raw) != need:
            raise DataFormatError(f"{path}: {len(raw)} bytes, but its header ({n} sequences, {s} sizes) needs {need}: "
                                  "truncated or corrupt; re-binarize")
        dim_offsets = np.frombuffer(raw, np.int64, n + 1, head)
        data_offsets = np.frombuffer(raw, np.int64, n + 1, head + 8 * (n + 1))
        all_sizes = np.frombuffer(raw, np.int64, s, head + 16 * (n + 1))
        if dim_offsets[0] != 0 or dim_offsets[-1] != s or (np.diff(dim_offsets) != 1).any():
            raise DataFormatError(f"{path}: items are not 1-D sequences (dim offsets must step by 1); only token "
                                  "data is supported")
        if data_offsets[0] != 0 or not np.array_equal(np.diff(data_offsets), all_sizes):
            raise DataFormatError(f"{path}: data offsets do not follow from the sizes: corrupt index; re-binarize")
        self.sizes = all_sizes.astype(np.int64)
        self.layout = "torchnet"
        self.doc_idx = None
        self._starts = data_offsets[:-1].copy()
        self._ends = data_offsets[1:].copy()

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {self.prefix} ({len(self)} sequences)")
        i = int(i) % len(self)
        out = self._data[self._starts[i]: self._ends[i]].astype(np.int64)  # a copy: writable
        return torch.from_numpy(out - self.offset if self.offset else out)

    def max_id(self) -> int:
        return int(self._data.max()) - self.offset if len(self._data) else -1

    def check_ids(self, dictionary: Dictionary, dict_path: str | os.PathLike = "the dictionary") -> None:
        """Every id must name a symbol: a larger one means the dictionary belongs to other data."""
        if len(self._data) and int(self._data.min()) - self.offset < 0:
            hint = (" (a legacy file stores id + 1; one holding 0 was not written by fairseq: "
                    "fix_lua_indexing=False reads it as is)" if self.offset else "")
            raise DataFormatError(f"{self.prefix}.bin: negative token ids{hint}: corrupt data; re-run preprocess")
        top = self.max_id()
        if top >= len(dictionary):
            raise DataFormatError(f"{self.prefix}.bin holds id {top} but {dict_path} has {len(dictionary)} symbols: "
                                  "the dictionary is not the one this data was binarized with; use the dict*.txt "
                                  "from the same data-bin, or re-run preprocess")


def load_indexed_dataset(prefix: str | os.PathLike, dictionary: Dictionary | None = None,
                         dict_path: str | os.PathLike = "the dictionary") -> IndexedDataset:
    ds = IndexedDataset(prefix)
    if dictionary is not None:
        ds.check_ids(dictionary, dict_path)
    return ds


def best_dtype(vocab_size: int) -> np.dtype:
    """fairseq's choice: uint16 below 65500 symbols, uint32 below 2**32 - 1, else int64."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.uint32 if vocab_size < 4294967295 else np.int64)


class IndexedDatasetBuilder:
    """Writes an MMIDIDX ``.bin/.idx`` pair; both appear (atomically) only at ``finalize()``.

    The index is fairseq's layout (what fairseq-train reads); ``doc_index=True`` writes Megatron's variant instead
    (document count and the ``end_document()`` boundaries), which fairseq itself misreads."""

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16, doc_index: bool = False):
        self.prefix = str(prefix)
        self.doc_index = doc_index
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_TO_CODE:
            raise ValueError(f"dtype {self.dtype}: token data is stored as one of "
                             f"{[str(d) for d in DTYPE_TO_CODE]}")
        self._info = np.iinfo(self.dtype)
        self._tmp_bin = Path(self.prefix).with_name(f".{Path(self.prefix).name}.bin.tmp{os.getpid()}")
        self._bin = open(self._tmp_bin, "wb")
        self.sizes: list[int] = []
        self.doc_idx: list[int] = [0]

    def add_item(self, ids) -> None:
        a = ids.numpy() if torch.is_tensor(ids) else np.asarray(ids)
        if a.ndim != 1:
            raise ValueError(f"add_item takes a 1-D sequence of ids, got shape {a.shape}")
        if a.size and (a.min() < self._info.min or a.max() > self._info.max):
            raise ValueError(f"ids outside {self.dtype}'s range [{self._info.min}, {self._info.max}]: pick a wider "
                             "dtype (best_dtype(len(dictionary)))")
        self._bin.write(a.astype(self.dtype).tobytes())
        self.sizes.append(int(a.size))

    def end_document(self) -> None:
        self.doc_idx.append(len(self.sizes))

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.asarray(self.sizes, dtype=np.int64)
        if (sizes > np.iinfo(np.int32).max).any():
            raise ValueError("a sequence longer than 2**31-1 tokens cannot be indexed")
        pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) * self.dtype.itemsize \
            if len(sizes) else np.zeros(0, np.int64)
        header = MMAP_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_TO_CODE[self.dtype]) \
            + struct.pack("<Q", len(sizes))
        if self.doc_index:
            docs = self.doc_idx if self.doc_idx[-1] == len(sizes) else self.doc_idx + [len(sizes)]
            header += struct.pack("<Q", len(docs))
        index = header + sizes.astype(np.int32).tobytes() + pointers.tobytes()
        if self.doc_index:
            index += np.asarray(docs, np.int64).tobytes()
        os.replace(self._tmp_bin, self.prefix + ".bin")
        atomic_write(self.prefix + ".idx", index)

    def abort(self) -> None:
        self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)


# --- a data-bin directory ----------------------------------------------------------------------------------------

def split_prefix(data_dir: str | os.PathLike, split: str, src: str | None = None, tgt: str | None = None,
                 lang: str | None = None) -> Path:
    """``{data_dir}/{split}.{src}-{tgt}.{lang}`` (parallel) or ``{data_dir}/{split}`` (monolingual)."""
    if src is None:
        return Path(data_dir) / split
    return Path(data_dir) / f"{split}.{src}-{tgt}.{lang}"


def dict_path(data_dir: str | os.PathLike, lang: str | None = None) -> Path:
    return Path(data_dir) / (f"dict.{lang}.txt" if lang else "dict.txt")


def load_monolingual(data_dir: str | os.PathLike, split: str) -> tuple[IndexedDataset, Dictionary]:
    dpath = dict_path(data_dir)
    d = Dictionary.load(dpath)
    return load_indexed_dataset(split_prefix(data_dir, split), d, dpath), d


def load_parallel(data_dir: str | os.PathLike, split: str, src: str, tgt: str
                  ) -> tuple[IndexedDataset, IndexedDataset, Dictionary, Dictionary]:
    """Source and target datasets and dictionaries of one split. Like fairseq, the files may be named for either
    direction (``train.en-de.*`` serves de->en too)."""
    pair = f"{src}-{tgt}"
    if not Path(str(split_prefix(data_dir, split, src, tgt, src)) + ".idx").exists():
        if Path(str(split_prefix(data_dir, split, tgt, src, src)) + ".idx").exists():
            pair = f"{tgt}-{src}"
        else:
            raise FileNotFoundError(f"{data_dir}: no {split}.{src}-{tgt}.{src}.idx (nor {split}.{tgt}-{src}.{src}.idx);"
                                    f" check data_dir, the split name and the languages ({src}->{tgt})")
    out = []
    dicts = []
    for lang in (src, tgt):
        dpath = dict_path(data_dir, lang)
        d = Dictionary.load(dpath)
        dicts.append(d)
        out.append(load_indexed_dataset(Path(data_dir) / f"{split}.{pair}.{lang}", d, dpath))
    if len(out[0]) != len(out[1]):
        raise DataFormatError(f"{data_dir}: {split}.{pair}.{src} has {len(out[0])} sequences but "
                              f"{split}.{pair}.{tgt} has {len(out[1])}; the two sides must pair up: re-run preprocess")
    return out[0], out[1], dicts[0], dicts[1]
