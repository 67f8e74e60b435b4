"""fairseq data-bin reading and writing: the byte layouts built by hand here, the dictionary's file semantics, and
clear errors for corrupt, truncated or mismatched files."""
import pickle
import struct

import numpy as np
import pytest
import torch

from attnlab.tasks.fairseq_data import (DataFormatError, Dictionary, IndexedDataset, IndexedDatasetBuilder,
                                        best_dtype, load_indexed_dataset, load_monolingual, load_parallel)

SEQS = [[4, 5, 6, 2], [7, 2], [], [65000, 9, 2]]


def mmap_bytes(seqs, dtype=np.uint16, code=8, docs=None):
    """MMIDIDX by the documented layout: magic, <Q version, <B dtype code, <Q N, int32 sizes, int64 byte pointers
    (fairseq); with ``docs``, Megatron's variant: <Q D after N and D int64 document boundaries at the end."""
    sizes = [len(s) for s in seqs]
    itemsize = np.dtype(dtype).itemsize
    pointers = np.cumsum([0] + sizes[:-1]) * itemsize if seqs else []
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", len(seqs))
    if docs is not None:
        idx += struct.pack("<Q", len(docs))
    idx += struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers)
    if docs is not None:
        idx += struct.pack(f"<{len(docs)}q", *docs)
    data = b"".join(np.asarray(s, dtype=dtype).tobytes() for s in seqs)
    return idx, data


def legacy_bytes(seqs, code=4, elsize=4, dtype=np.int32, stored_offset=1):
    """TNTIDX: magic, <Q version, <QQ code and element size, <QQ N and S, N+1 dim offsets, N+1 data offsets
    (elements), S sizes; all int64. fairseq's writer stores id + 1."""
    n = len(seqs)
    sizes = [len(s) for s in seqs]
    data_offsets = np.cumsum([0] + sizes)
    idx = (b"TNTIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<QQ", code, elsize) + struct.pack("<QQ", n, n)
           + struct.pack(f"<{n + 1}q", *range(n + 1)) + struct.pack(f"<{n + 1}q", *data_offsets)
           + struct.pack(f"<{n}q", *sizes))
    return idx, b"".join((np.asarray(s, dtype=dtype) + stored_offset).astype(dtype).tobytes() for s in seqs)


def write_pair(prefix, idx, data):
    (prefix.parent / (prefix.name + ".idx")).write_bytes(idx)
    (prefix.parent / (prefix.name + ".bin")).write_bytes(data)
    return prefix


def check_seqs(ds, seqs):
    assert len(ds) == len(seqs)
    assert ds.sizes.tolist() == [len(s) for s in seqs]
    for i, s in enumerate(seqs):
        assert ds[i].dtype == torch.int64 and ds[i].ndim == 1
        assert ds[i].tolist() == s
    assert ds[-1].tolist() == seqs[-1]


@pytest.mark.parametrize("docs", [None, [0, 1, 4]])
def test_reads_hand_built_mmap(tmp_path, docs):
    ds = IndexedDataset(write_pair(tmp_path / "train", *mmap_bytes(SEQS, docs=docs)))
    assert ds.format == "mmap" and ds.dtype == np.uint16
    assert ds.layout == ("fairseq" if docs is None else "megatron")
    assert (ds.doc_idx is None) if docs is None else ds.doc_idx.tolist() == docs
    check_seqs(ds, SEQS)
    with pytest.raises(IndexError):
        ds[len(SEQS)]


def test_pickles_by_path(tmp_path):
    big = [list(range(4, 1004))] * 50
    ds = IndexedDataset(write_pair(tmp_path / "train", *mmap_bytes(big)))
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # the 100 KB of tokens are re-mapped in the worker, not copied into it
    check_seqs(pickle.loads(blob), big)


def test_reads_hand_built_legacy(tmp_path):
    ds = IndexedDataset(write_pair(tmp_path / "train", *legacy_bytes(SEQS)))
    assert ds.format == "legacy" and ds.dtype == np.int32
    check_seqs(ds, SEQS)  # stored id + 1, read back as id
    raw = IndexedDataset(tmp_path / "train", fix_lua_indexing=False)
    assert raw[0].tolist() == [s + 1 for s in SEQS[0]]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
@pytest.mark.parametrize("doc_index", [False, True])
def test_writer_matches_layout_and_round_trips(tmp_path, dtype, doc_index):
    b = IndexedDatasetBuilder(tmp_path / "x", dtype, doc_index=doc_index)
    b.add_item(torch.tensor(SEQS[0]))
    b.add_item(np.array(SEQS[1]))
    b.end_document()
    for s in SEQS[2:]:
        b.add_item(s)
    b.end_document()
    b.finalize()
    code = {np.uint16: 8, np.int32: 4, np.int64: 5}[dtype]
    idx, data = mmap_bytes(SEQS, dtype, code, docs=[0, 2, 4] if doc_index else None)
    assert (tmp_path / "x.idx").read_bytes() == idx  # byte-identical to the documented layout
    assert (tmp_path / "x.bin").read_bytes() == data
    ds = IndexedDataset(tmp_path / "x")
    check_seqs(ds, SEQS)
    assert (ds.doc_idx.tolist() == [0, 2, 4]) if doc_index else ds.doc_idx is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]  # no temp files left


def test_writer_rejects_ids_outside_dtype(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "x", np.uint16)
    with pytest.raises(ValueError, match="wider"):
        b.add_item([70000])
    b.abort()
    assert best_dtype(65499) == np.uint16 and best_dtype(65500) == np.uint32


@pytest.mark.parametrize("doc_index", [False, True])
def test_empty_dataset(tmp_path, doc_index):
    b = IndexedDatasetBuilder(tmp_path / "e", np.uint16, doc_index=doc_index)
    b.finalize()
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.sizes.shape == (0,)


DICT_TXT = "the 10\nof 7\n, 7\nthe 3 #fairseq:overwrite\n\u2581Hal 2\nlo 1\n"


def test_dictionary_file_semantics(tmp_path):
    (tmp_path / "dict.txt").write_text(DICT_TXT, encoding="utf-8")
    d = Dictionary.load(tmp_path / "dict.txt")
    assert (d.bos(), d.pad(), d.eos(), d.unk()) == (0, 1, 2, 3)
    assert d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    # the overwrite row appends a new id and re-points the word at it (fairseq's behaviour); the old slot remains
    assert d.symbols[4:] == ["the", "of", ",", "the", "\u2581Hal", "lo"] and len(d) == 10
    assert d.index("the") == 7 and d.count[7] == 3 and d.count[4] == 10
    assert d.index("never-seen") == d.unk()
    ids = d.encode_line("  of  the\tnever-seen ,")
    assert ids.dtype == torch.int64 and ids.tolist() == [5, 7, 3, 6, 2]
    assert len(d) == 10  # encoding never grows the dictionary unless asked
    assert d.string(ids) == "of the <unk> ,"
    assert d.string(ids, include_eos=True) == "of the <unk> , </s>"
    assert d.string(torch.tensor([[0, 8, 9, 2, 1], [5, 2, 1, 1, 1]]), post_process="sentencepiece") == "Hallo\nof"
    with pytest.raises(IndexError, match="another dictionary"):
        d.string([42])
    # save writes the non-special rows; loading the saved file gives the same symbols except that an overwritten
    # word is now a plain duplicate (fairseq saves without the flag too): that must be an error naming the fix
    d.save(tmp_path / "saved.txt")
    assert (tmp_path / "saved.txt").read_text().splitlines()[0] == "the 10"
    with pytest.raises(DataFormatError, match=r"saved.txt:4: duplicate symbol 'the'.*#fairseq:overwrite"):
        Dictionary.load(tmp_path / "saved.txt")


def test_dictionary_errors(tmp_path):
    (tmp_path / "dup.txt").write_text("a 1\nb 2\na 3\n")
    with pytest.raises(DataFormatError, match=r"dup.txt:3: duplicate symbol 'a'"):
        Dictionary.load(tmp_path / "dup.txt")
    (tmp_path / "bad.txt").write_text("a 1\nnocount\n")
    with pytest.raises(DataFormatError, match=r"bad.txt:2: 'nocount' is not"):
        Dictionary.load(tmp_path / "bad.txt")
    (tmp_path / "bad2.txt").write_text("a x\n")
    with pytest.raises(DataFormatError, match="bad2.txt:1"):
        Dictionary.load(tmp_path / "bad2.txt")
    with pytest.raises(FileNotFoundError, match="dict"):
        Dictionary.load(tmp_path / "missing.txt")
    # a symbol containing spaces is impossible, but one that looks like a count is fine: only the last field counts
    (tmp_path / "num.txt").write_text("12 5\n")
    assert Dictionary.load(tmp_path / "num.txt").index("12") == 4


def test_dictionary_build():
    lines = [["b", "a", "c", "a"], ["c", "d", "a", "<unk>"], ["e"]]
    d = Dictionary.build(lines, padding_factor=8)
    # by count, ties alphabetical; a special token in the text is not added twice
    assert d.symbols[4:9] == ["a", "c", "b", "d", "e"]
    assert d.symbols[9:] == [f"madeupword{i:04d}" for i in range(7)] and len(d) == 16  # 9 -> multiple of 8
    d2 = Dictionary.build(lines, threshold=2, padding_factor=1)
    assert d2.symbols[4:] == ["a", "c"]
    d3 = Dictionary.build(lines, nwords=6, padding_factor=1)
    assert d3.symbols[4:] == ["a", "c"]
    # extra symbols (a sentencepiece vocabulary) follow with count 0, once, and within the nwords cap
    d4 = Dictionary.build(lines, threshold=2, padding_factor=1, extra_symbols=["z", "a", "y"])
    assert d4.symbols[4:] == ["a", "c", "z", "y"] and d4.count[6:] == [0, 0]
    assert Dictionary.build(lines, nwords=7, padding_factor=1, extra_symbols=["z", "y"]).symbols[4:] == ["a", "c", "b"]


def _bin_dir(tmp_path, seqs=SEQS[:2], vocab=8):
    (tmp_path / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(vocab - 4)))
    write_pair(tmp_path / "train", *mmap_bytes(seqs))
    return tmp_path


def test_monolingual_and_dictionary_mismatch(tmp_path):
    ds, d = load_monolingual(_bin_dir(tmp_path), "train")
    assert d.string(ds[0]) == "w0 w1 w2"
    write_pair(tmp_path / "train", *mmap_bytes([[4, 8, 2]]))  # id 8 == len(dict)
    with pytest.raises(DataFormatError, match=r"train.bin holds id 8 but .*dict.txt has 8 symbols"):
        load_monolingual(tmp_path, "train")


def test_parallel(tmp_path):
    for lang in ("en", "de"):
        (tmp_path / f"dict.{lang}.txt").write_text("x 1\ny 1\nz 1\n")
    write_pair(tmp_path / "valid.en-de.en", *mmap_bytes([[4, 2], [5, 6, 2]]))
    write_pair(tmp_path / "valid.en-de.de", *mmap_bytes([[6, 2], [4, 2]]))
    s, t, sd, td = load_parallel(tmp_path, "valid", "en", "de")
    assert sd.string(s[1]) == "y z" and td.string(t[0]) == "z"
    s2, t2, _, _ = load_parallel(tmp_path, "valid", "de", "en")  # the reverse direction reads the same files
    assert s2[0].tolist() == [6, 2] and t2[0].tolist() == [4, 2]
    with pytest.raises(FileNotFoundError, match="test.en-de.en.idx"):
        load_parallel(tmp_path, "test", "en", "de")
    write_pair(tmp_path / "valid.en-de.de", *mmap_bytes([[6, 2]]))
    with pytest.raises(DataFormatError, match="has 2 sequences but valid.en-de.de has 1"):
        load_parallel(tmp_path, "valid", "en", "de")


def test_corrupt_files(tmp_path):
    idx, data = mmap_bytes(SEQS)

    def expect(idx_bytes, bin_bytes, pattern):
        p = write_pair(tmp_path / "c", idx_bytes, bin_bytes)
        with pytest.raises(DataFormatError, match=pattern):
            load_indexed_dataset(p)

    expect(idx, data[:-2], r"c.bin: 16 bytes, but .*c.idx describes 18")
    expect(idx, data + b"\0\0", r"c.bin: 20 bytes")
    expect(idx[:-8], data, r"c.idx: .*truncated")
    expect(idx[:20], data, r"c.idx: 20 bytes, shorter than the 26-byte MMIDIDX header")
    expect(b"NOTANIDX" + idx[8:], data, r"c.idx: starts with")
    expect(idx[:9] + struct.pack("<Q", 2) + idx[17:], data, r"version 2")
    expect(idx[:17] + struct.pack("<B", 99) + idx[18:], data, r"unknown dtype code 99")
    expect(idx[:17] + struct.pack("<B", 6) + idx[18:], data, r"floating point")
    bad_ptr = bytearray(idx)
    struct.pack_into("<q", bad_ptr, 26 + 4 * len(SEQS) + 8, 3)
    expect(bytes(bad_ptr), data, r"byte offsets do not follow")
    midx, _ = mmap_bytes(SEQS, docs=[0, 4])
    expect(midx[:-1], data, r"c.idx: .*Megatron's layout.*truncated")
    expect(mmap_bytes(SEQS, docs=[0, 3])[0], data, r"document index is not")
    lidx, ldata = legacy_bytes(SEQS)
    expect(lidx, ldata[:-4], r"c.bin: .* but .*c.idx describes")
    expect(lidx[:16] + struct.pack("<QQ", 4, 2) + lidx[32:], ldata, r"element size 2 disagrees")
    expect(lidx[:-8], ldata, r"truncated")
    write_pair(tmp_path / "c", *legacy_bytes([[0, 2]], stored_offset=0))  # not written by fairseq: holds a 0
    with pytest.raises(DataFormatError, match=r"c.bin: negative token ids \(a legacy file stores id \+ 1"):
        load_indexed_dataset(tmp_path / "c", Dictionary())
    (tmp_path / "c.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"c.bin: missing"):
        load_indexed_dataset(tmp_path / "c")
