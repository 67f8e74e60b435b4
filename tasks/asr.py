"""Speech recognition data for CTC: features, label sequences, length-bucketed batches.

Corpora (``format``), one per split (``train`` / ``val`` / ``test`` name a folder or file under ``data_dir``; an
absolute path, or one with ``..``, points elsewhere, e.g. a test set from another corpus). ``extra_test`` maps more
names to test sets of the same format (``{real: ../asr_pocketsphinx/test}``), evaluated after ``test`` and logged as
``test_<name>/<metric>``:

- ``kaldi``: a Kaldi data directory: ``wav.scp`` (``utt path`` or ``utt command |``, the command writing a wav to
  stdout, e.g. WSJ's ``sph2pipe -f wav x.wv1 |``) and ``text`` (``utt words ...``); with ``feats.scp`` present
  (and ``use_feats_scp``) its features are read through kaldiio instead of computing filterbanks. ``utt2spk`` and
  other files are ignored.
- ``manifest``: a TSV file ``audio_path<TAB>transcript`` per line (``#`` starts a comment line).
- ``librispeech``: a LibriSpeech split as distributed (``dev-clean/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt``
  beside the ``.flac`` files, read with the soundfile package; ``.wav`` works too), e.g. ``data_dir=.../LibriSpeech
  train=train-clean-100 val=dev-clean test=test-clean units=chars``.
Relative audio paths resolve against the folder of the file that names them.

Features: ``n_mels`` log-mel filterbanks (attnlab.tasks.features: 25 ms / 10 ms, HTK mel scale) of the audio
resampled to ``sample_rate``, plus ``deltas`` orders of delta features; computed once per utterance and cached as
``<cache_dir>/<sha1 of the audio samples and the parameters>.npy`` (written atomically, read with
``allow_pickle=False``). Per split an index (utterance -> cache file, frames) keyed by the hash of the scp lines and the
parameters lets later runs skip reading the audio: a file rewritten in place under the same path is not noticed
(delete the cache dir then). ``cmvn: utterance`` normalises each utterance to zero mean, unit variance per dimension.

Targets (``units``): ``phones`` looks the words up in a CMUdict-format ``lexicon`` (``WORD  P1 P2 ..``, alternates
``WORD(2)`` ignored, ``;;;`` comments; stress digits stripped unless ``keep_stress``); ``chars`` spells the
normalised text (lower case, letters, apostrophes and spaces; space is a label); ``tokens`` takes the transcript as
space-separated labels already (e.g. espeak's phonemes in the synthetic corpus, ``text_file: phones``). Label 0 is
the CTC blank; the label set is every unit in the transcripts of all splits, sorted.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from attnlab.io import atomic_write

from .features import add_deltas, fbank, resample
from .sampling import eval_loader, train_loader

log = logging.getLogger("attnlab")
BLANK = "<blank>"


# -- files --------------------------------------------------------------------------------------------------------
def save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write(path, buf.getvalue())


def read_table(path: Path) -> dict[str, str]:
    """Kaldi ``key rest-of-line`` file -> {key: rest} (order kept)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            key, _, rest = line.partition(" ")
            if key in out:
                raise ValueError(f"{path}:{n}: utterance {key!r} appears twice")
            out[key] = rest.strip()
    return out


def read_wav_bytes(data: bytes, source: str) -> tuple[torch.Tensor, int]:
    """PCM wav bytes -> (first channel as float in the 16-bit integer range, sample rate)."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{source}: not a PCM wav file ({e}). Fix: convert it to 16-bit PCM wav "
                         f"(e.g. `sox in.flac out.wav`) or give a Kaldi pipe `cmd |` that writes one") from None
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        raise ValueError(f"{source}: {8 * width}-bit wav is not supported; use 8, 16 or 32-bit PCM")
    x = np.frombuffer(frames, dtype=dtype).reshape(-1, channels)[:, 0].astype(np.float64)
    if width == 1:
        x = (x - 128) * 256
    elif width == 4:
        x = x / 65536
    return torch.from_numpy(x), rate


def read_audio(spec: str, base: Path) -> tuple[torch.Tensor, int]:
    """A wav.scp / manifest entry: a path (relative to ``base``) or a Kaldi pipe ``command |``."""
    if spec.endswith("|"):
        res = subprocess.run(spec[:-1], shell=True, cwd=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if res.returncode != 0:
            raise RuntimeError(f"audio command failed ({res.returncode}): {spec}\n{res.stderr.decode()[-500:]}")
        return read_wav_bytes(res.stdout, spec)
    path = Path(spec) if os.path.isabs(spec) else base / spec
    if path.suffix.lower() in (".flac", ".ogg"):
        try:
            import soundfile
        except ImportError:
            raise ValueError(f"{path}: reading {path.suffix} needs the soundfile package (pip install soundfile), "
                             f"or convert the audio to wav") from None
        x, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
        return torch.from_numpy(x[:, 0].astype(np.float64)), rate
    return read_wav_bytes(path.read_bytes(), str(path))


def read_lexicon(path: str | Path, keep_stress: bool = False) -> dict[str, list[str]]:
    """CMUdict format -> {lower-case word: phones} (first pronunciation of each word)."""
    lex: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip() or line.startswith(";;;"):
                continue
            word, *phones = line.split()
            word = word.lower()
            if re.search(r"\(\d+\)$", word):
                continue
            if not keep_stress:
                phones = [re.sub(r"\d$", "", p) for p in phones]
            lex.setdefault(word, phones)
    if not lex:
        raise ValueError(f"lexicon {path} has no entries")
    return lex


def normalize_text(text: str) -> str:
    """Lower case; hyphens become spaces; anything but letters, apostrophes and spaces is dropped."""
    text = re.sub(r"[-\u2013\u2014/]", " ", text.lower())
    return " ".join(re.sub(r"[^a-z' ]", "", text).split())


# -- a split ------------------------------------------------------------------------------------------------------
def list_utterances(root: Path, fmt: str, text_file: str, use_feats_scp: bool) -> list[dict]:
    """[{"id", "audio" or "feats", "base", "text"}] of one split."""
    if fmt == "kaldi":
        if not root.is_dir():
            raise FileNotFoundError(f"no Kaldi data directory {root} (wav.scp + text expected)")
        texts = read_table(root / text_file)
        feats = root / "feats.scp"
        if use_feats_scp and feats.exists():
            table, key = read_table(feats), "feats"
        elif (root / "wav.scp").exists():
            table, key = read_table(root / "wav.scp"), "audio"
        else:
            raise FileNotFoundError(f"{root} has neither wav.scp nor feats.scp")
        missing = [u for u in table if u not in texts]
        if missing:
            raise ValueError(f"{root}: {len(missing)} utterances have no transcript in {text_file}, e.g. "
                             f"{missing[:3]}")
        return [{"id": u, key: spec, "base": str(root), "text": texts[u]} for u, spec in table.items()]
    if fmt == "manifest":
        path = root if root.suffix else root.with_suffix(".tsv")
        if not path.is_file():
            raise FileNotFoundError(f"no manifest {path} (lines: audio_path<TAB>transcript)")
        out = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip() or line.startswith("#"):
                    continue
                if "\t" not in line:
                    raise ValueError(f"{path}:{n}: expected audio_path<TAB>transcript")
                audio, text = line.rstrip("\n").split("\t", 1)
                out.append({"id": f"{path.stem}-{n}", "audio": audio, "base": str(path.parent), "text": text})
        return out
    if fmt == "librispeech":
        if not root.is_dir():
            raise FileNotFoundError(
                f"no LibriSpeech split {root} (e.g. LibriSpeech/dev-clean: <speaker>/<chapter>/"
                f"<speaker>-<chapter>.trans.txt and the .flac files). Fix: download it from https://openslr.org/12 "
                f"and unpack it in {root.parent.parent}, or with torchaudio: `python -c \"import torchaudio; "
                f"torchaudio.datasets.LIBRISPEECH('{root.parent.parent}', url='{root.name}', download=True)\"` "
                f"(then task.data_dir={root.parent.parent}/LibriSpeech)")
        out = []
        for trans in sorted(root.glob("*/*/*.trans.txt")):
            for utt, text in read_table(trans).items():
                audio = next((f"{utt}{ext}" for ext in (".flac", ".wav") if (trans.parent / f"{utt}{ext}").exists()),
                             None)
                if audio is None:
                    raise FileNotFoundError(f"{trans.parent}: no audio for {utt} (.flac or .wav)")
                out.append({"id": utt, "audio": audio, "base": str(trans.parent), "text": text})
        return out
    raise ValueError(f"unknown format {fmt!r}; expected 'kaldi', 'manifest' or 'librispeech'")


class FeatureCache:
    """Filterbanks of utterances, each computed once: ``<dir>/<sha1(samples, params)>.npy``."""

    def __init__(self, cache_dir: Path, params: dict):
        self.dir, self.params = Path(cache_dir), params
        self.tag = json.dumps(params, sort_keys=True)

    def compute(self, wave_: torch.Tensor, rate: int) -> np.ndarray:
        p = self.params
        x = resample(wave_, rate, p["sample_rate"])
        f = fbank(x, p["sample_rate"], p["n_mels"], p["frame_length_ms"], p["frame_shift_ms"], p["preemphasis"],
                  p["low_freq"], p["high_freq"])
        if p["deltas"]:
            f = add_deltas(f, p["deltas"])
        return f.numpy().astype(np.float32)

    def index(self, utts: list[dict]) -> list[tuple[str, int]]:
        """(cache file name, frames) per utterance; computes what is missing."""
        key = hashlib.sha1((self.tag + "\n" + "\n".join(f"{u['id']} {u['audio']} {u['base']}" for u in utts))
                           .encode()).hexdigest()
        index_path = self.dir / f"index-{key}.json"
        if index_path.exists():
            entries = json.loads(index_path.read_text())
            if all((self.dir / name).exists() for name, _ in entries):
                return [tuple(e) for e in entries]
        entries = []
        for i, u in enumerate(utts):
            x, rate = read_audio(u["audio"], Path(u["base"]))
            h = hashlib.sha1(self.tag.encode())
            h.update(str(rate).encode())
            h.update(x.numpy().tobytes())
            name = h.hexdigest() + ".npy"
            path = self.dir / name
            if path.exists():
                frames = int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
            else:
                feats = self.compute(x, rate)
                save_npy(path, feats)
                frames = feats.shape[0]
            entries.append((name, frames))
            if (i + 1) % 1000 == 0:
                log.info("filterbanks: %d / %d utterances", i + 1, len(utts))
        atomic_write(index_path, json.dumps(entries))
        return entries


class ASRDataset(Dataset):
    def __init__(self, loaders: list, frames: list[int], targets: list[list[int]], cmvn: str):
        self.loaders, self.frames, self.targets, self.cmvn = loaders, frames, targets, cmvn

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = torch.from_numpy(np.array(self.loaders[i](), dtype=np.float32))
        if self.cmvn == "utterance" and len(x) > 1:
            x = (x - x.mean(0)) / x.std(0).clamp_min(1e-5)
        return x, torch.tensor(self.targets[i], dtype=torch.long)


def collate(samples) -> dict:
    feats, targets = zip(*samples)
    B, T, U = len(feats), max(len(f) for f in feats), max(max(len(t) for t in targets), 1)
    x = torch.zeros(B, T, feats[0].shape[1])
    y = torch.zeros(B, U, dtype=torch.long)
    for b, (f, t) in enumerate(samples):
        x[b, : len(f)] = f
        y[b, : len(t)] = t
    return {"features": x, "feature_lengths": torch.tensor([len(f) for f in feats]),
            "targets": y, "target_lengths": torch.tensor([len(t) for t in targets])}


class _NpyLoader:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self):
        return np.load(self.path, allow_pickle=False)


class _KaldiLoader:
    def __init__(self, spec: str, base: str):
        self.spec, self.base = spec, base

    def __call__(self):
        import kaldiio  # optional: only Kaldi feats.scp input needs it
        spec = self.spec
        path, _, offset = spec.rpartition(":") if re.search(r":\d+$", spec) else (spec, "", "")
        if not os.path.isabs(path):
            path = os.path.join(self.base, path)
        return kaldiio.load_mat(f"{path}:{offset}" if offset else path)


class ASRDataModule(pl.LightningDataModule):
    batch_kind = "ctc"

    def __init__(self, data_dir: str, format: str = "kaldi", train: str = "train", val: str = "dev",
                 test: str = "test", units: str = "phones", text_file: str = "text", lexicon: str | None = None,
                 keep_stress: bool = False, oov: str = "error", use_feats_scp: bool = True,
                 cache_dir: str | None = None, sample_rate: int = 16000, n_mels: int = 40, deltas: int = 0,
                 frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
                 low_freq: float = 20.0, high_freq: float = 0.0, cmvn: str = "utterance",
                 max_train_frames: int | None = None, batch_size: int | None = None,
                 max_tokens: int | None = 20000, seed: int = 0, num_workers: int = 0,
                 extra_test: dict[str, str] | None = None):
        super().__init__()
        if units not in ("phones", "chars", "tokens"):
            raise ValueError(f"unknown units {units!r}; expected 'phones', 'chars' or 'tokens'")
        if units == "phones" and not lexicon:
            raise ValueError("units=phones needs a pronunciation lexicon: set `task.lexicon=PATH` (CMUdict format), "
                             "or use `task.units=chars`")
        if oov not in ("error", "skip"):
            raise ValueError(f"oov must be 'error' or 'skip', got {oov!r}")
        if cmvn not in ("utterance", "none"):
            raise ValueError(f"cmvn must be 'utterance' or 'none', got {cmvn!r}")
        self.save_hyperparameters()
        # test sets in order, name -> path: the module logs `test/...` for the first, `test_<name>/...` for the others
        self.test_sets = {"test": test, **{f"test_{k}": v for k, v in (extra_test or {}).items()}}
        self.test_names = list(self.test_sets)
        self.splits: dict[str, ASRDataset] | None = None
        self.units: list[str] = []

    # -- what the network and the module need ---------------------------------------------------------------
    def net_args(self) -> dict:
        self.load()
        return {"input_dim": self.input_dim, "vocab_size": len(self.units)}

    def label_text(self, labels) -> str:
        """Label ids -> text (chars joined; other units space-separated)."""
        sep = "" if self.hparams.units == "chars" else " "
        return sep.join(self.units[i] for i in labels)

    # -- loading ------------------------------------------------------------------------------------------------
    def _split_path(self, name: str) -> Path:
        return Path(self.hparams.data_dir) / name

    def _units_of(self, text: str, lexicon, oov_words: dict) -> list[str]:
        h = self.hparams
        if h.units == "tokens":
            return text.split()
        if h.units == "chars":
            return list(normalize_text(text))
        out = []
        for w in normalize_text(text).split():
            if w in lexicon:
                out += lexicon[w]
            else:
                oov_words[w] = oov_words.get(w, 0) + 1
        return out

    def load(self) -> None:
        """Read transcripts, compute or find the features of every split; idempotent."""
        if self.splits is not None:
            return
        h = self.hparams
        params = {k: h[k] for k in ("sample_rate", "n_mels", "deltas", "frame_length_ms", "frame_shift_ms",
                                    "preemphasis", "low_freq", "high_freq")}
        cache = FeatureCache(Path(h.cache_dir) if h.cache_dir else Path(h.data_dir) / "fbank_cache", params)
        raw, oov_words = {}, {}
        for split, name in {"train": h.train, "val": h.val, **self.test_sets}.items():
            raw[split] = list_utterances(self._split_path(name), h.format, h.text_file, h.use_feats_scp)
            if not raw[split]:
                raise ValueError(f"split {split} ({self._split_path(name)}) has no utterances")
        lexicon = None
        if h.units == "phones":
            if not Path(h.lexicon).is_file():
                raise FileNotFoundError(f"no lexicon {h.lexicon} (task.lexicon): a CMUdict-format file is needed for "
                                        f"units=phones")
            lexicon = read_lexicon(h.lexicon, h.keep_stress)
        for utts in raw.values():
            for u in utts:
                u["units"] = self._units_of(u["text"], lexicon, oov_words)
        if oov_words and h.oov == "error":
            common = sorted(oov_words, key=oov_words.get, reverse=True)
            raise ValueError(f"{len(oov_words)} words are not in the lexicon {h.lexicon}, e.g. {common[:8]}. Fix: "
                             f"add them to the lexicon, or set `task.oov=skip` to leave them out of the targets")
        self.units = [BLANK] + sorted({p for utts in raw.values() for u in utts for p in u["units"]})
        ids = {p: i for i, p in enumerate(self.units)}
        self.splits, self.input_dim = {}, None
        for split, utts in raw.items():
            audio = [u for u in utts if "audio" in u]
            entries = iter(cache.index(audio)) if audio else iter(())
            loaders, frames, targets = [], [], []
            for u in utts:
                if "audio" in u:
                    name, n = next(entries)
                    loaders.append(_NpyLoader(cache.dir / name))
                else:
                    loaders.append(_KaldiLoader(u["feats"], u["base"]))
                    n = None
                frames.append(n)
                targets.append([ids[p] for p in u["units"]])
            if any(n is None for n in frames):  # Kaldi features: their length is known once read
                frames = [len(ld()) if n is None else n for ld, n in zip(loaders, frames)]
            dim = int(loaders[0]().shape[1])
            if self.input_dim not in (None, dim):
                raise ValueError(f"split {split} has {dim}-dimensional features, other splits {self.input_dim}")
            self.input_dim = dim
            keep = [i for i, n in enumerate(frames) if n > 0 and (split != "train" or not h.max_train_frames
                                                                   or n <= h.max_train_frames)]
            if len(keep) < len(frames):
                log.info("%s: %d of %d utterances kept (empty or longer than max_train_frames=%s)", split,
                         len(keep), len(frames), h.max_train_frames)
            self.splits[split] = ASRDataset([loaders[i] for i in keep], [frames[i] for i in keep],
                                            [targets[i] for i in keep], h.cmvn)
        log.info("asr: %s utterances, %d labels, %d-dim features",
                 {k: len(v) for k, v in self.splits.items()}, len(self.units), self.input_dim)

    def setup(self, stage: str | None = None):
        self.load()

    # -- loaders ------------------------------------------------------------------------------------------------
    def _batching(self, dataset) -> dict:
        h = self.hparams
        if h.max_tokens is not None and h.batch_size is None:
            return {"max_tokens": h.max_tokens, "lengths": dataset.frames}
        return {"batch_size": h.batch_size}

    def train_dataloader(self):
        ds = self.splits["train"]
        return train_loader(ds, collate, self.trainer, self.hparams.seed, self.hparams.num_workers,
                            **self._batching(ds))

    def _eval_loader(self, split: str):
        ds = self.splits[split]
        return eval_loader(ds, collate, self.trainer, self.hparams.num_workers, **self._batching(ds))

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        loaders = [self._eval_loader(name) for name in self.test_names]
        return loaders if len(loaders) > 1 else loaders[0]
