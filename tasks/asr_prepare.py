"""Prepare speech corpora that need no licence and no download at training time.

``synth``: real English sentences (the prose of Python's own documentation that every Python installation ships:
``pydoc_data.topics`` and the standard library's docstrings), spoken by eSpeak NG (the library and voices that the
``espeakng-loader`` package bundles, called through ctypes), with eSpeak's phoneme transcription of exactly what it
speaks (IPA, stress marks dropped): a real audio -> phoneme task. Several voices, speaking rates and pitches.
Sentences never cross splits (not even two that differ only in case or punctuation). With a ``--lexicon`` (CMUdict
format; by default the one the ``pocketsphinx`` corpus below brings) only sentences whose every word it knows are
kept, so that the task's targets (the words' CMUdict phonemes, ARPAbet) are exact and shared with the real-speech
set. Output: Kaldi data directories ``<out>/{train,dev,test}`` with ``wav.scp``, ``text`` (the sentence),
``phones`` (space-separated phonemes), ``utt2spk`` (the voice), and 16 kHz wavs in ``<out>/wav``.

``pocketsphinx``: the real (LibriVox and command) utterances with transcripts from the test data of pocketsphinx's
source distribution, plus its CMUdict lexicon: ``pip download`` fetches the sdist once (or give ``--sdist``), and
``<out>/test`` is a Kaldi directory (``text`` in words; phones through ``<out>/cmudict-en-us.dict``).

    python -m attnlab.tasks.asr_prepare pocketsphinx --out data/asr_pocketsphinx
    python -m attnlab.tasks.asr_prepare synth --out data/asr_synth
"""
from __future__ import annotations

import argparse
import ast
import ctypes
import io
import logging
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch

from attnlab.io import atomic_write

from .asr import normalize_text, read_lexicon
from .features import resample

log = logging.getLogger("attnlab")
VOICES = ("en-us", "en-us+m3", "en-us+f2", "en-us+f4", "en-us+m7", "en", "en+f3", "en+m2")
SENTENCE = re.compile(r"[A-Z][a-z]*(?:[ ,;'\-]+[A-Za-z]+)+[.?!]")


# -- sentences ------------------------------------------------------------------------------------------------------
def python_doc_sentences(min_words: int = 4, max_words: int = 24) -> list[str]:
    """Plain-English sentences of Python's documentation topics and standard-library docstrings, deduplicated,
    sorted: letters, spaces, commas, semicolons, apostrophes and hyphens only (no code, no numbers)."""
    texts = []
    try:
        from pydoc_data.topics import topics
        texts += topics.values()
    except ImportError:
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    out = set()
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            if SENTENCE.fullmatch(s) and min_words <= len(s.split()) <= max_words:
                out.add(s)
    return sorted(out)


# -- eSpeak NG through ctypes -----------------------------------------------------------------------------------------
class Espeak:
    """Synthesis to memory (AUDIO_OUTPUT_SYNCHRONOUS) and text -> phonemes, on the library espeakng-loader ships."""

    RATE, PITCH = 1, 3  # espeak_PARAMETER values

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise RuntimeError("the synthetic corpus needs eSpeak NG: pip install espeakng-loader "
                               "(or pip install -e '.[asr]')") from None
        self.lib = lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.sample_rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with data at "
                               f"{espeakng_loader.get_data_path()}")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def on_audio(samples, n, events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(samples, (n,)).copy())
            return 0
        self._callback = callback_type(on_audio)  # kept: the library holds only a raw pointer to it
        lib.espeak_SetSynthCallback(self._callback)
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]

    def set_voice(self, name: str, rate: int = 175, pitch: int = 50) -> None:
        if self.lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise ValueError(f"eSpeak has no voice {name!r}")
        self.lib.espeak_SetParameter(self.RATE, rate, 0)
        self.lib.espeak_SetParameter(self.PITCH, pitch, 0)

    def synthesize(self, text: str) -> np.ndarray:
        """int16 samples at ``self.sample_rate``."""
        self._chunks = []
        data = text.encode()
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 1, None, None)  # POS_CHARACTER, CHARS_UTF8
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) on {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def phonemes(self, text: str) -> list[str]:
        """IPA phonemes (one per eSpeak phoneme, multi-letter ones kept whole), stress marks dropped."""
        buf = ctypes.create_string_buffer(text.encode())
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        out = []
        while ptr.value:
            # phonememode: bit 1 = IPA; bits 8-23 = separator between phonemes (a space)
            res = self.lib.espeak_TextToPhonemes(ctypes.byref(ptr), 1, 0x02 | (ord(" ") << 8))
            if res:
                out += res.decode().split()
        phones = [re.sub("[ˈˌ]", "", p) for p in out]
        return [p for p in phones if p]


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


def write_kaldi_dir(root: Path, rows: list[dict], extra: tuple[str, ...] = ()) -> None:
    """rows of {"id", "wav", "text", <extra files>...} -> wav.scp, text, (extra), sorted by utterance id."""
    rows = sorted(rows, key=lambda r: r["id"])
    for name, key in [("wav.scp", "wav"), ("text", "text"), *[(e, e) for e in extra]]:
        atomic_write(root / name, "".join(f"{r['id']} {r[key]}\n" for r in rows))


def split_sentences(sentences: list[str], n_sentences: int, n_dev: int, n_test: int, rng: np.random.Generator,
                    lexicon: dict | None = None) -> dict[str, list[str]]:
    """{dev, test, train} of distinct sentences: one per normalised text (what the targets see), those with a word
    the lexicon lacks dropped, ``n_sentences`` drawn at random."""
    by_text = {}
    for s in sentences:
        words = normalize_text(s).split()
        if lexicon is None or all(w in lexicon for w in words):
            by_text.setdefault(" ".join(words), s)
    sentences = sorted(by_text.values())
    sentences = [sentences[i] for i in rng.permutation(len(sentences))[:n_sentences]]
    if len(sentences) < n_dev + n_test + 1:
        raise ValueError(f"only {len(sentences)} usable sentences found; lower --dev/--test")
    return {"dev": sentences[:n_dev], "test": sentences[n_dev:n_dev + n_test], "train": sentences[n_dev + n_test:]}


def prepare_synth(out: Path, n_sentences: int = 3000, n_dev: int = 200, n_test: int = 200, seed: int = 0,
                  sample_rate: int = 16000, voices: tuple[str, ...] = VOICES, lexicon: Path | None = None) -> dict:
    rng = np.random.default_rng(seed)
    splits = split_sentences(python_doc_sentences(), n_sentences, n_dev, n_test, rng,
                             read_lexicon(lexicon) if lexicon else None)
    tts = Espeak()
    stats = {}
    for split, items in splits.items():
        rows, seconds = [], 0.0
        for i, sentence in enumerate(items):
            voice = voices[int(rng.integers(len(voices)))]
            rate, pitch = int(rng.integers(140, 211)), int(rng.integers(30, 71))
            tts.set_voice(voice, rate, pitch)
            audio = tts.synthesize(sentence)
            phones = tts.phonemes(sentence)
            x = resample(torch.from_numpy(audio.astype(np.float64)), tts.sample_rate, sample_rate).numpy()
            x = np.clip(np.round(x), -32768, 32767).astype(np.int16)
            utt = f"{split}-{i:05d}"
            atomic_write(out / "wav" / f"{utt}.wav", wav_bytes(x, sample_rate))
            rows.append({"id": utt, "wav": f"../wav/{utt}.wav", "text": sentence, "phones": " ".join(phones),
                         "utt2spk": voice})
            seconds += len(x) / sample_rate
        write_kaldi_dir(out / split, rows, ("phones", "utt2spk"))
        stats[split] = {"utterances": len(rows), "hours": round(seconds / 3600, 3)}
        log.info("%s: %d utterances, %.2f h", split, len(rows), seconds / 3600)
    return stats


def prepare_pocketsphinx(out: Path, sdist: Path | None = None, version: str = "5.1.1") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", "pocketsphinx", "--no-deps",
                            f"pocketsphinx=={version}", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("pocketsphinx-*.tar.gz"))
        rows, seconds = [], 0.0
        with tarfile.open(sdist) as tar:
            members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name and m.isfile()}

            def read(name):
                return tar.extractfile(members[name]).read()
            atomic_write(out / "cmudict-en-us.dict", read("model/en-us/cmudict-en-us.dict"))
            # transcription files: "<s> words </s> (utterance id)" per line, the wavs beside them
            for folder, trans in [("test/data/librivox", "transcription"), ("test/data/cards", "cards.transcription")]:
                for line in read(f"{folder}/{trans}").decode().splitlines():
                    m = re.fullmatch(r"\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^)]+)\)\s*", line)
                    if not m:
                        continue
                    words, name = m.groups()
                    data = read(f"{folder}/{name}.wav")
                    utt = f"{Path(folder).name}-{name}"
                    atomic_write(out / "wav" / f"{utt}.wav", data)
                    with wave.open(io.BytesIO(data)) as w:
                        seconds += w.getnframes() / w.getframerate()
                    rows.append({"id": utt, "wav": f"../wav/{utt}.wav", "text": words})
    write_kaldi_dir(out / "test", rows)
    stats = {"test": {"utterances": len(rows), "seconds": round(seconds, 1)}}
    log.info("pocketsphinx: %d utterances, %.1f s", len(rows), seconds)
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="corpus", required=True)
    s = sub.add_parser("synth", help="eSpeak NG reading Python's documentation (audio + phonemes)")
    s.add_argument("--out", type=Path, default=Path("data/asr_synth"))
    s.add_argument("--sentences", type=int, default=3000)
    s.add_argument("--dev", type=int, default=200)
    s.add_argument("--test", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lexicon", default="data/asr_pocketsphinx/cmudict-en-us.dict",
                   help="keep only sentences whose words this CMUdict-format lexicon knows ('none': keep all)")
    ps = sub.add_parser("pocketsphinx", help="real speech from pocketsphinx's source distribution + CMUdict")
    ps.add_argument("--out", type=Path, default=Path("data/asr_pocketsphinx"))
    ps.add_argument("--sdist", type=Path, default=None, help="a downloaded pocketsphinx-*.tar.gz (else pip download)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.corpus == "synth":
        lexicon = None if a.lexicon == "none" else Path(a.lexicon)
        if lexicon is not None and not lexicon.is_file():
            p.error(f"no lexicon {lexicon}: run `python -m attnlab.tasks.asr_prepare pocketsphinx` first (it brings "
                    f"CMUdict), or give --lexicon PATH, or --lexicon none")
        stats = prepare_synth(a.out, a.sentences, a.dev, a.test, a.seed, lexicon=lexicon)
    else:
        stats = prepare_pocketsphinx(a.out, a.sdist)
    print(stats)


if __name__ == "__main__":
    main()
