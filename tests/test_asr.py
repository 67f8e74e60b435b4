"""Speech recognition: filterbanks against an independent implementation, CTC decoding, error rates, the datamodule
on Kaldi and manifest data written here, and one training step end to end."""
import math
import wave
from functools import lru_cache
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab.asr_metrics import ErrorRate
from attnlab.decoding.ctc import beam_decode, greedy_decode, prefix_beam_search
from attnlab.tasks import asr
from attnlab.tasks.features import add_deltas, fbank, resample

ROOT = Path(__file__).resolve().parents[1]


# -- filterbanks ----------------------------------------------------------------------------------------------------
def numpy_fbank(x, sr, n_mels=40, win_ms=25, hop_ms=10, pre=0.97, low=20.0):
    """Written from the conventions in tasks/features.py's docstring: one frame at a time, a plain DFT sum."""
    win, hop = sr * win_ms // 1000, sr * hop_ms // 1000
    n_fft = 1
    while n_fft < win:
        n_fft *= 2
    hz2mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = hz2mel(low), hz2mel(sr / 2)
    centers = [lo + (hi - lo) * i / (n_mels + 1) for i in range(n_mels + 2)]
    filters = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        for k in range(n_fft // 2 + 1):
            b = hz2mel(k * sr / n_fft)
            if centers[m] < b < centers[m + 2]:
                filters[m, k] = ((b - centers[m]) / (centers[m + 1] - centers[m]) if b <= centers[m + 1]
                                 else (centers[m + 2] - b) / (centers[m + 2] - centers[m + 1]))
    hamming = np.array([0.54 - 0.46 * np.cos(2 * np.pi * n / (win - 1)) for n in range(win)])
    n = np.arange(n_fft)
    out = []
    for start in range(0, len(x) - win + 1, hop):
        f = np.array(x[start:start + win], dtype=np.float64)
        f = f - f.mean()
        f = np.concatenate([[f[0] - pre * f[0]], f[1:] - pre * f[:-1]]) * hamming
        f = np.concatenate([f, np.zeros(n_fft - win)])
        power = [(f @ np.cos(2 * np.pi * k * n / n_fft)) ** 2 + (f @ np.sin(2 * np.pi * k * n / n_fft)) ** 2
                 for k in range(n_fft // 2 + 1)]
        out.append(np.log(np.maximum(filters @ np.array(power), 1e-10)))
    return np.array(out)


def test_fbank_matches_an_independent_numpy_implementation():
    sr = 16000
    rng = np.random.default_rng(0)
    t = np.arange(int(0.08 * sr)) / sr
    x = 3000 * np.sin(2 * np.pi * 440 * t) + 500 * rng.standard_normal(len(t))
    ours = fbank(torch.from_numpy(x), sr).double().numpy()
    ref = numpy_fbank(x, sr)
    assert ours.shape == ref.shape == (1 + (len(x) - 400) // 160, 40)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


def test_deltas_are_the_regression_formula():
    feats = torch.randn(7, 3, dtype=torch.float64)
    d = add_deltas(feats, order=1)[:, 3:]
    padded = np.concatenate([feats[:1].numpy()] * 2 + [feats.numpy()] + [feats[-1:].numpy()] * 2)
    ref = np.array([(1 * (padded[t + 3] - padded[t + 1]) + 2 * (padded[t + 4] - padded[t])) / 10 for t in range(7)])
    np.testing.assert_allclose(d.numpy(), ref, atol=1e-12)


def test_resample_keeps_the_band_and_removes_what_is_above_it():
    t = torch.arange(22050, dtype=torch.float64) / 22050
    y = resample(torch.sin(2 * math.pi * 1000 * t), 22050, 16000)
    assert len(y) == 16000
    t2 = torch.arange(16000, dtype=torch.float64) / 16000
    assert (y - torch.sin(2 * math.pi * 1000 * t2))[100:-100].abs().max() < 5e-3
    above = resample(torch.sin(2 * math.pi * 10000 * t), 22050, 16000)  # above the new Nyquist (8 kHz)
    assert above[100:-100].abs().max() < 0.02


# -- CTC decoding -----------------------------------------------------------------------------------------------------
def test_greedy_merges_repeats_and_drops_blanks():
    path = [1, 1, 0, 1, 2, 2, 0, 0]  # a a _ a b b _ _ -> a a b
    lp = torch.log(torch.nn.functional.one_hot(torch.tensor(path), 3).double() * 0.9 + 0.1 / 3)
    assert greedy_decode(lp[None]) == [[1, 1, 2]]
    assert greedy_decode(lp[None], torch.tensor([3])) == [[1]]


def brute_force(probs):
    """Every alignment enumerated: labelling -> total probability."""
    T, V = probs.shape
    totals = {}
    for path in product(range(V), repeat=T):
        labels, prev = [], None
        for c in path:
            if c != prev and c != 0:
                labels.append(c)
            prev = c
        totals[tuple(labels)] = totals.get(tuple(labels), 0.0) + float(np.prod([probs[t, c] for t, c in
                                                                               enumerate(path)]))
    return totals


def test_prefix_beam_finds_the_labelling_greedy_misses():
    # blank 0.6, "a" 0.4 at both frames: the best path is blank blank (""), p=0.36, but "a" has three paths
    # (a a, a _, _ a): 0.16 + 0.24 + 0.24 = 0.64.
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    assert greedy_decode(probs.log()[None]) == [[]]
    (best, score), *_ = prefix_beam_search(probs.log(), beam_size=4)
    assert best == (1,) and math.isclose(math.exp(score), 0.64, rel_tol=1e-12)
    assert beam_decode(probs.log()[None]) == [[1]]


def test_prefix_beam_with_a_wide_beam_is_exact():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64) * 2, -1)
    exact = brute_force(probs.numpy())
    beams = prefix_beam_search(probs.log(), beam_size=100)
    assert len(beams) == len(exact)
    for labels, score in beams:
        assert math.isclose(math.exp(score), exact[labels], rel_tol=1e-9)
    assert beams[0][0] == max(exact, key=exact.get)


# -- error rates ------------------------------------------------------------------------------------------------------
def levenshtein(a, b):
    @lru_cache(maxsize=None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_error_rates_against_an_independent_edit_distance():
    refs = ["the cat sat on the mat", "hello world", "a b c"]
    hyps = ["the bat sat on mat today", "hello world", ""]
    wer, cer = ErrorRate("word"), ErrorRate("char")
    wer.update(hyps[:2], refs[:2])
    wer.update(hyps[2:], refs[2:])  # sums across updates: the rate of the whole set, not a mean of batch rates
    cer.update(hyps, refs)
    words = sum(levenshtein(tuple(r.split()), tuple(h.split())) for r, h in zip(refs, hyps))
    assert words == 3 + 0 + 3  # cat->bat, -the, +today; three deletions
    assert math.isclose(float(wer.compute()), words / sum(len(r.split()) for r in refs))
    chars = sum(levenshtein(r, h) for r, h in zip(refs, hyps))
    assert math.isclose(float(cer.compute()), chars / sum(len(r) for r in refs))
    per = ErrorRate("token")
    per.update([[1, 2, 3], [4]], [[1, 3], [4, 4]])
    assert math.isclose(float(per.compute()), (1 + 1) / 4)


# -- data -------------------------------------------------------------------------------------------------------------
def write_wav(path: Path, seconds: float, freq: float, sr: int = 16000, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 8000 * np.sin(2 * np.pi * freq * t) + 300 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(x.astype("<i2").tobytes())


LEXICON = ";;; tiny CMUdict-format lexicon\nhello HH AH0 L OW1\nhello(2) HH EH0 L OW1\nworld W ER1 L D\ncat K AE1 T\n"


@pytest.fixture
def corpus(tmp_path):
    """A Kaldi corpus of two utterances (train = dev = test) with words, phonemes and a lexicon; and a manifest."""
    root = tmp_path / "corpus"
    write_wav(root / "audio" / "u1.wav", 0.5, 300, seed=1)
    write_wav(root / "audio" / "u2.wav", 0.8, 700, sr=8000, seed=2)  # another rate: resampled to 16 kHz
    for split in ("train", "dev", "test"):
        d = root / split
        d.mkdir()
        (d / "wav.scp").write_text("u1 ../audio/u1.wav\nu2 ../audio/u2.wav\n")
        (d / "text").write_text("u1 hello world\nu2 cat\n")
        (d / "phones").write_text("u1 h ə l oʊ w ɜː l d\nu2 k æ t\n")
        (d / "utt2spk").write_text("u1 s1\nu2 s2\n")
    real = root / "real"  # a second test set: words only
    real.mkdir()
    (real / "wav.scp").write_text("r1 ../audio/u2.wav\n")
    (real / "text").write_text("r1 Hello, cat!\n")
    (root / "lexicon.txt").write_text(LEXICON)
    (root / "train.tsv").write_text(f"# audio\ttranscript\n{root}/audio/u1.wav\tHello, world!\naudio/u2.wav\tcat\n")
    return root


def make_dm(root, **kw):
    args = dict(data_dir=str(root), units="phones", lexicon=str(root / "lexicon.txt"), max_tokens=None,
                batch_size=2)
    args.update(kw)
    dm = asr.ASRDataModule(**args)
    dm.setup("fit")
    return dm


def test_kaldi_directory_gives_features_and_phoneme_targets(corpus):
    dm = make_dm(corpus)
    assert dm.net_args() == {"input_dim": 40, "vocab_size": 1 + 10}  # blank + AE AH D ER HH K L OW T W
    assert dm.units[0] == asr.BLANK and sorted(dm.units[1:]) == dm.units[1:]
    batch = asr.collate([dm.splits["train"][i] for i in range(2)])
    assert batch["features"].shape == (2, 78, 40) and batch["features"].dtype == torch.float32
    assert batch["feature_lengths"].tolist() == [48, 78]  # 0.5 s and 0.8 s at 10 ms (25 ms windows)
    assert batch["target_lengths"].tolist() == [8, 3]
    assert dm.label_text(batch["targets"][0, :8].tolist()) == "HH AH L OW W ER L D"
    assert dm.label_text(batch["targets"][1, :3].tolist()) == "K AE T"
    f = batch["features"][0, :48]
    assert torch.allclose(f.mean(0), torch.zeros(40), atol=1e-3)  # utterance CMVN
    train = next(iter(dm.train_dataloader()))
    assert set(train) == {"features", "feature_lengths", "targets", "target_lengths"}


def test_features_are_cached_and_not_recomputed(corpus, monkeypatch):
    make_dm(corpus)
    cached = sorted(p.name for p in (corpus / "fbank_cache").iterdir())
    assert sum(n.endswith(".npy") for n in cached) == 2  # the three splits share the two utterances' files
    monkeypatch.setattr(asr.FeatureCache, "compute", lambda *a: pytest.fail("recomputed a cached utterance"))
    dm = make_dm(corpus, units="tokens", text_file="phones")
    assert sorted(p.name for p in (corpus / "fbank_cache").iterdir()) == cached
    assert dm.label_text(dm.splits["test"].targets[1]) == "k æ t"
    for p in (corpus / "fbank_cache").glob("index-*.json"):  # without the index: the audio hash finds the files
        p.unlink()
    make_dm(corpus, units="chars")


def test_manifest_and_character_targets(corpus):
    dm = make_dm(corpus, format="manifest", train="train.tsv", val="train.tsv", test="train.tsv", units="chars",
                 deltas=2, cmvn="none")
    assert dm.input_dim == 120
    assert [dm.label_text(t) for t in dm.splits["val"].targets] == ["hello world", "cat"]


def test_extra_test_sets_are_read_in_order(corpus):
    dm = make_dm(corpus, extra_test={"real": "real"})
    assert dm.test_names == ["test", "test_real"]
    assert [dm.label_text(t) for t in dm.splits["test_real"].targets] == ["HH AH L OW K AE T"]  # punctuation dropped
    loaders = dm.test_dataloader()
    assert len(loaders) == 2 and len(loaders[1].dataset) == 1
    assert not isinstance(make_dm(corpus).test_dataloader(), list)  # one test set: one loader, as Lightning expects


def test_synthetic_sentences_are_distinct_across_splits_and_known_to_the_lexicon():
    from attnlab.tasks.asr_prepare import split_sentences
    sentences = ["Hello world.", "Hello, world!", "hello world", "Cat world.", "World cat hello.", "Cat cat.",
                 "Zorg cat.", "World, world.", "Hello cat."]
    lexicon = {"hello": ["HH"], "world": ["W"], "cat": ["K"]}
    splits = split_sentences(sentences, 100, 2, 2, np.random.default_rng(0), lexicon)
    texts = {k: [asr.normalize_text(s) for s in v] for k, v in splits.items()}
    flat = [t for v in texts.values() for t in v]
    assert len(flat) == len(set(flat)) == 6  # the three spellings of "hello world" count once; "zorg" is dropped
    assert all(w in lexicon for t in flat for w in t.split())
    assert (len(splits["dev"]), len(splits["test"]), len(splits["train"])) == (2, 2, 2)
    again = split_sentences(sentences, 100, 2, 2, np.random.default_rng(0), lexicon)
    assert again == splits  # the seed decides


def test_unknown_words_are_listed(corpus):
    (corpus / "dev" / "text").write_text("u1 hello planet\nu2 zorg cat\n")
    with pytest.raises(ValueError, match=r"2 words are not in the lexicon.*planet.*oov=skip"):
        make_dm(corpus)
    dm = make_dm(corpus, oov="skip")
    assert dm.label_text(dm.splits["val"].targets[1]) == "K AE T"


def test_espeak_speaks_and_transcribes():
    from attnlab.tasks.asr_prepare import Espeak
    tts = Espeak()
    tts.set_voice("en-us")
    audio = tts.synthesize("The cat sat on the mat.")
    assert audio.dtype == np.int16 and len(audio) > 0.5 * tts.sample_rate and np.abs(audio).max() > 1000
    phones = tts.phonemes("The cat sat on the mat.")
    assert phones[:2] == ["ð", "ə"] and "æ" in phones and all("ˈ" not in p for p in phones)


# -- end to end -------------------------------------------------------------------------------------------------------
TINY = ["model.net.d_model=16", "model.net.n_heads=2", "model.net.d_ff=32", "model.net.n_layers=1"]


@pytest.mark.parametrize("attention,targets", [
    ("softmax", []),  # the task's default: espeak-style phoneme tokens, PER
    ("linear", ["task.units=chars", "task.text_file=text", "model.metrics=[per,cer,wer]", "monitor.metric=val/cer",
                "model.decoder=beam"]),  # characters, prefix beam search
    *[(name, []) for name in ("memsizer", "topk", "reformer", "reformer_lsh4", "performer", "linformer")],
])
def test_fast_dev_run(compose_cfg, corpus, attention, targets):
    from attnlab.train import run
    cfg = compose_cfg(["task=asr", f"attention={attention}", "logger=none", "trainer.fast_dev_run=true",
                       "trainer.accelerator=cpu", f"task.data_dir={corpus}", "task.max_tokens=200",
                       f"task.lexicon={corpus}/lexicon.txt", f"task.extra_test.real={corpus}/real", *TINY, *targets])
    results = run(cfg)
    m = results["metrics"]
    assert results["steps"] == 1 and all(v == v for v in m.values())
    names = ["per", "cer", "wer"] if targets else ["per"]
    assert all(0 <= m[f"{split}/{k}"] for k in names for split in ("test", "test_real"))
    assert m["test/loss"] > 0 and m["test_real/loss"] > 0


def test_a_trained_run_tests_its_best_checkpoint_on_every_test_set(compose_cfg, corpus):
    """Not fast_dev_run: a checkpoint is written and the test loads it back with weights_only=True, so everything the
    datamodule saved in it (its hyperparameters, the extra test sets among them) must be plain data."""
    from attnlab.train import run
    cfg = compose_cfg(["task=asr", "attention=linear", "logger=none", "trainer.accelerator=cpu", "trainer.max_steps=2",
                       "trainer.val_check_interval=2", f"task.data_dir={corpus}", "task.max_tokens=200",
                       f"task.lexicon={corpus}/lexicon.txt", f"task.extra_test.real={corpus}/real", *TINY])
    results = run(cfg)
    assert results["steps"] == 2 and {"test/per", "test_real/per"} <= set(results["metrics"])


def test_blstm_builds_from_its_config_and_trains(compose_cfg, corpus):
    from attnlab.train import build
    cfg = compose_cfg(["task=asr", "model/net=blstm", "logger=none", f"task.data_dir={corpus}",
                       f"task.lexicon={corpus}/lexicon.txt", "task.extra_test=null",
                       "model.net.hidden_size=8", "model.net.n_layers=2"])
    datamodule, model, trainer = build(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    loss, n = model.training_loss(batch)
    loss.backward()
    assert type(model.net).__name__ == "BLSTM" and n == batch["target_lengths"].sum() and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.net.parameters())


@pytest.mark.parametrize("variant,attention,net", [("softmax", "softmax", "CTCTransformer"),
                                                   ("linear", "linear", "CTCTransformer"),
                                                   ("reformer", "reformer", "CTCTransformer"),
                                                   ("blstm", "linear", "BLSTM")])
def test_wsj_experiments_compose(compose_cfg, tmp_path, variant, attention, net):
    from attnlab.train import build
    cfg = compose_cfg([f"experiment=katharopoulos2020/wsj_{variant}", "logger=none", f"paths.data_dir={tmp_path}"])
    assert cfg.attention.name == attention and cfg.model.net._target_.endswith(net)
    assert cfg.task.units == "phones" and cfg.task.n_mels == 40 and cfg.monitor.metric == "val/per"
    if attention == "reformer":
        assert cfg.attention.n_hashes == 4  # the paper's LSH-4
    if net == "CTCTransformer":
        assert (cfg.model.net.n_layers, cfg.model.net.n_heads) == (9, 6)
    else:
        assert (cfg.model.net.n_layers, cfg.model.net.hidden_size) == (3, 320)
    with pytest.raises(FileNotFoundError, match="train_si284"):  # no corpus here: the error names what is missing
        build(cfg)


@pytest.mark.parametrize("attention", sorted(p.stem for p in (ROOT / "conf/attention").glob("*.yaml")))
def test_every_variant_encodes_padded_speech(compose_cfg, attention):
    """Each attention variant in the CTC encoder: padding frames do not change the outputs of the real frames."""
    from omegaconf import OmegaConf
    from attnlab.speech import CTCTransformer
    cfg = OmegaConf.to_container(compose_cfg([f"attention={attention}", "logger=none"]).attention, resolve=True)
    torch.manual_seed(0)
    net = CTCTransformer(cfg, input_dim=8, vocab_size=5, max_len=64, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                         dropout=0.0).double().eval()
    x = torch.randn(2, 37, 8, dtype=torch.float64)
    lp, lengths = net(x, torch.tensor([37, 21]))
    assert lp.shape == (2, 10, 5) and lengths.tolist() == [10, 6]
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 10, dtype=torch.float64))
    alone, _ = net(x[1:, :21], torch.tensor([21]))
    if attention.startswith("reformer"):
        return  # hashing buckets depend on the padded length: compared only for shape
    assert torch.allclose(lp[1, :6], alone[0, :6], atol=1e-6)


def test_librispeech_layout(tmp_path):
    for split, spk in [("train-clean-100", "19"), ("dev-clean", "84")]:
        chapter = tmp_path / split / spk / "198"
        for i, freq in enumerate([300, 500]):
            write_wav(chapter / f"{spk}-198-{i:04d}.wav", 0.3, freq, seed=i)
        (chapter / f"{spk}-198.trans.txt").write_text(f"{spk}-198-0000 NORTHANGER ABBEY\n{spk}-198-0001 CHAPTER ONE\n")
    dm = make_dm(tmp_path, format="librispeech", train="train-clean-100", val="dev-clean", test="dev-clean",
                 units="chars")
    assert [dm.label_text(t) for t in dm.splits["test"].targets] == ["northanger abbey", "chapter one"]
    assert dm.splits["train"].frames == [28, 28]
    with pytest.raises(FileNotFoundError, match=r"no LibriSpeech split .*test-other.*openslr.org/12.*torchaudio"):
        make_dm(tmp_path, format="librispeech", train="train-clean-100", val="dev-clean", test="test-other",
                units="chars")


def test_kaldi_feats_scp_is_read_instead_of_the_audio(corpus):
    import kaldiio
    rng = np.random.default_rng(0)
    feats = {u: rng.standard_normal((n, 13)).astype(np.float32) for u, n in [("u1", 30), ("u2", 12)]}
    for split in ("train", "dev", "test"):
        kaldiio.save_ark(str(corpus / split / "feats.ark"), feats, scp=str(corpus / split / "feats.scp"))
        (corpus / split / "wav.scp").unlink()
    dm = make_dm(corpus, cmvn="none")
    assert dm.input_dim == 13 and dm.splits["val"].frames == [30, 12]
    np.testing.assert_array_equal(dm.splits["val"][1][0].numpy(), feats["u2"])
