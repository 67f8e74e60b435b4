"""Translation / summarization: metrics against the reference libraries, label smoothing by hand, the datamodule's
batching and length limits, and fast_dev_run of task=wmt / task=summarization on a data-bin written by preprocess."""
import math
import random

import pytest
import sacrebleu
import torch

from attnlab.modules.seq2seq import label_smoothed_nll_loss
from attnlab.tasks.preprocess import preprocess
from attnlab.tasks.sampling import eval_loader, train_loader
from attnlab.tasks.translation import Seq2SeqDataModule
from attnlab.text_metrics import ROUGE_KEYS, CorpusBLEU, rouge_scores, split_sentences
from attnlab.train import run

HYPS = ["The cat sat on the mat.", "A quick brown fox jumps over the dog!", "Hello world", "Nothing matches here",
        "It rained all day, and then it stopped."]
REFS = ["The cat is sitting on the mat.", "The quick brown fox jumped over the lazy dog!", "Hello, world.",
        "Completely different words", "It rained all day. Then it stopped."]


def test_corpus_bleu_equals_sacrebleu_and_sums_across_processes():
    direct = sacrebleu.corpus_bleu(HYPS, [REFS])
    whole = CorpusBLEU()
    whole.update(HYPS[:2], REFS[:2])
    whole.update(HYPS[2:], REFS[2:])
    assert float(whole.compute()) == pytest.approx(direct.score, abs=1e-9)
    assert 0 < direct.score < 100
    assert "tok:13a" in whole.signature() and "version:" in whole.signature()
    # two "processes": their summed statistics (dist_reduce_fx=sum) give the corpus score, not a mean of scores
    a, b = CorpusBLEU(), CorpusBLEU()
    a.update(HYPS[:3], REFS[:3])
    b.update(HYPS[3:], REFS[3:])
    a.stats += b.stats
    assert float(a.compute()) == pytest.approx(direct.score, abs=1e-9)
    assert str(a.score()).split()[2] == str(direct).split()[2]


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    ours = rouge_scores(HYPS, REFS)
    for k in ROUGE_KEYS:
        direct = [100 * scorer.score(split_sentences(r), split_sentences(h))[k].fmeasure for h, r in zip(HYPS, REFS)]
        assert ours[k] == pytest.approx(direct, abs=1e-12)
    assert split_sentences("It rained. Then it stopped!") == "It rained.\nThen it stopped!"
    # Lsum matches sentence by sentence, L over the whole text: swapped sentences lower L only
    swapped = rouge_scores(["Then it stopped. It rained all day."], ["It rained all day. Then it stopped."])
    assert swapped["rougeLsum"][0] == pytest.approx(100.0) and swapped["rougeL"][0] < 75


def test_label_smoothing_by_hand():
    torch.manual_seed(0)
    V, eps = 5, 0.1
    logits = torch.randn(2, 3, V, dtype=torch.float64)
    targets = torch.tensor([[1, 4, -100], [0, -100, -100]])
    loss, nll, n = label_smoothed_nll_loss(logits, targets, eps)
    want_loss = want_nll = 0.0
    for b in range(2):
        for t in range(3):
            y = int(targets[b, t])
            if y == -100:
                continue
            logp = [float(v) - math.log(sum(math.exp(float(u)) for u in logits[b, t])) for v in logits[b, t]]
            # fairseq: (1 - eps - eps/(V-1)) * nll + eps/(V-1) * sum_v -log p_v
            want_loss += (1 - eps - eps / (V - 1)) * -logp[y] + eps / (V - 1) * -sum(logp)
            want_nll += -logp[y]
    assert int(n) == 3
    assert float(nll) == pytest.approx(want_nll, rel=1e-6)
    assert float(loss) == pytest.approx(want_loss, rel=1e-6)
    # eps = 0: the plain cross-entropy
    l0, n0, _ = label_smoothed_nll_loss(logits, targets, 0.0)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    assert float(l0) == pytest.approx(float(ce), rel=1e-6) and float(n0) == pytest.approx(float(ce), rel=1e-6)


# --- a tiny parallel corpus: "translate" digit words to their reverse order in another vocabulary --------------

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NULL = ["null", "eins", "zwei", "drei", "vier", "fuenf", "sechs", "sieben", "acht", "neun"]


def _pairs(n, seed, max_len=7, long_every=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = 12 if long_every and i % long_every == 0 else rng.randint(1, max_len)
        xs = [rng.randrange(10) for _ in range(k)]
        out.append((" ".join(WORDS[x] for x in xs) + " .", " ".join(NULL[x] for x in reversed(xs)) + " ."))
    return out


@pytest.fixture(scope="module")
def parallel_bin(tmp_path_factory):
    """A data-bin written by the preprocess entry point from raw text pairs (one sample in 10 long)."""
    root = tmp_path_factory.mktemp("pairs")
    splits = {"train": _pairs(64, 0, long_every=10), "valid": _pairs(12, 1), "test": _pairs(10, 2, long_every=5)}
    preprocess(root / "bin", splits, "en", "de", tokenizer="none", joined_dictionary=True, log=lambda *_: None)
    return root / "bin"


def test_max_tokens_batches_and_length_filter(parallel_bin, caplog):
    dm = Seq2SeqDataModule(str(parallel_bin), "en", "de", max_tokens=40, max_source_positions=10,
                           max_target_positions=10)
    with caplog.at_level("WARNING", logger="attnlab"):
        dm.setup()
    assert "train: 7 of 64 samples longer" in caplog.text  # the 13-token samples: skipped, counted, logged
    assert len(dm.datasets["train"]) == 57 and len(dm.datasets["test"]) == 8
    loader = train_loader(dm.datasets["train"], dm._collate(), None, seed=0, **dm._batching("train", 40))
    n = 0
    for batch in loader:
        B, S = batch["src"].shape
        T = batch["tgt_in"].shape[1]
        assert B * max(S, T) <= 40 and S <= 10 and T <= 10
        # teacher forcing: tgt_in is [bos] + targets[:-1]; padding is -100 in targets and True in the mask
        real = batch["targets"] != -100
        assert torch.equal(batch["tgt_in"][:, 0], torch.full((B,), dm.special_ids["bos"]))
        assert torch.equal(batch["tgt_in"][:, 1:][real[:, 1:]], batch["targets"][:, :-1][real[:, 1:]])
        assert torch.equal(batch["src_pad_mask"], batch["src"] == dm.special_ids["pad"])
        n += B
    assert n >= 57 - 40  # drop_last only drops the ragged end of the epoch
    seen = [i for b in eval_loader(dm.datasets["test"], dm._collate(), None, **dm._batching("test", 40))
            for i in b["ids"].tolist()]
    assert sorted(seen) == sorted(dm.datasets["test"].keep.tolist())  # every kept test sample once
    assert dm.reference("test", seen[0]) == dm.decode(dm.datasets["test"].tgt[seen[0]])

    strict = Seq2SeqDataModule(str(parallel_bin), "en", "de", max_tokens=40, max_source_positions=10,
                               max_target_positions=10, too_long="error")
    with pytest.raises(ValueError, match="longer than max_source_positions=10.*Fix"):
        strict.setup()
    cut = Seq2SeqDataModule(str(parallel_bin), "en", "de", max_tokens=40, max_source_positions=10,
                            max_target_positions=10, truncate_source=6)
    cut.setup()
    src = [cut.datasets["train"][i][1] for i in range(len(cut.datasets["train"]))]
    assert max(len(s) for s in src) == 6 and all(int(s[-1]) == cut.special_ids["eos"] for s in src)


def test_missing_data_names_the_prepare_command(tmp_path):
    dm = Seq2SeqDataModule(str(tmp_path / "nope"), "en", "de", prepare_command="python -m attnlab.tasks.prepare gramps")
    with pytest.raises(FileNotFoundError, match="python -m attnlab.tasks.prepare gramps"):
        dm.net_args()


TINY = ["model.net.d_model=16", "model.net.n_heads=2", "model.net.d_ff=32", "model.net.encoder_layers=1",
        "model.net.decoder_layers=1", "task.max_tokens=64", "task.reference_dir=null", "task.truncate_source=null",
        "task.max_source_positions=16", "task.max_target_positions=16", "model.generation.beam=2",
        "model.generation.max_len_b=4", "model.generation.min_len=1", "logger=none", "trainer.fast_dev_run=true",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
VARIANTS = {"softmax": ["attention=softmax"], "linear": ["attention=linear"],
            # the authors' MT setup: decoder self-attention MemSizer k=4, cross-attention k=32
            "memsizer": ["attention=memsizer", "attention.decoder.k=4", "attention.k=32"],
            # the other variants that serve all three roles (Reformer has no cross-attention, Linformer no causal
            # form: tests/test_configs.py checks that they are refused with the fix named)
            "topk": ["attention=topk", "attention.k=4"], "performer": ["attention=performer"]}


@pytest.mark.parametrize("task,metric", [("wmt", "bleu"), ("summarization", "rougeL")])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_dev_run(compose_cfg, parallel_bin, tmp_path, task, metric, variant):
    cfg = compose_cfg([f"task={task}", *VARIANTS[variant], f"task.data_dir={parallel_bin}", "task.source_lang=en",
                       "task.target_lang=de", *TINY], out=tmp_path / "run")
    results = run(cfg)
    m = results["metrics"]
    assert results["steps"] == 1
    assert 0 <= m[f"test/{metric}"] <= 100 and math.isfinite(m["test/nll_loss"]) and m["test/ppl"] > 1
    hyps = (tmp_path / "run/test.hyp.txt").read_text().splitlines()
    assert len(hyps) >= 1  # fast_dev_run: one test batch
    if task == "wmt":
        assert "signature" in (tmp_path / "run/test.scores.json").read_text()


def test_average_checkpoints_and_generate(compose_cfg, parallel_bin, tmp_path):
    from omegaconf import OmegaConf

    from attnlab.average_checkpoints import main as average_main
    from attnlab.generate import main as generate_main
    overrides = ["task=wmt", "attention=memsizer", f"task.data_dir={parallel_bin}", "task.source_lang=en",
                 "task.target_lang=de", *[o for o in TINY if "fast_dev_run" not in o], "trainer.max_steps=3",
                 "trainer.val_check_interval=1", "test=false", "callbacks.model_checkpoint.save_top_k=-1",
                 "model.val_generation.max_batches=1"]
    cfg = compose_cfg(overrides, out=tmp_path / "run")
    run(cfg)
    ckpts = tmp_path / "run/checkpoints"
    assert average_main([str(ckpts), "--num-last", "2", "--output", str(tmp_path / "avg.ckpt")]) == 0
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    avg, s2, s3 = load(tmp_path / "avg.ckpt"), load(ckpts / "step0000002.ckpt"), load(ckpts / "step0000003.ckpt")
    assert "optimizer_states" not in avg and avg["global_step"] == 3
    for k, v in avg["state_dict"].items():
        assert torch.allclose(v, (s2["state_dict"][k] + s3["state_dict"][k]) / 2, atol=1e-6), k
    with pytest.raises(ValueError, match="only 3 distinct"):
        average_main([str(ckpts), "--num-last", "4", "--output", str(tmp_path / "x.ckpt")])

    OmegaConf.save(cfg, tmp_path / "config.yaml")
    (tmp_path / "in.txt").write_text("one two three .\nnine .\nfive five six seven .\n")
    assert generate_main([str(tmp_path / "avg.ckpt"), "--config", str(tmp_path / "config.yaml"), "--input",
                          str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt"), "--beam", "2",
                          "--device", "cpu"]) == 0
    out = (tmp_path / "out.txt").read_text().split("\n")
    assert len(out) == 4 and out[-1] == ""  # one line per input line
    symbols = set((parallel_bin / "dict.de.txt").read_text().split()[::2])
    assert all(w in symbols for line in out for w in line.split())  # dictionary words, specials dropped


def test_raw_text_pairs_are_binarized_once_with_sentencepiece(tmp_path):
    for split, seed in (("train", 0), ("valid", 1), ("test", 2)):
        pairs = _pairs(40 if split == "train" else 5, seed)
        (tmp_path / f"{split}.en").write_text("".join(s + "\n" for s, _ in pairs))
        (tmp_path / f"{split}.de").write_text("".join(t + "\n" for _, t in pairs))
    dm = Seq2SeqDataModule(str(tmp_path), "en", "de", max_tokens=256, vocab_size=40)
    args = dm.net_args()
    assert (tmp_path / ".attnlab-bin/spm.model").is_file() and dm.post_process == "sentencepiece"
    assert args["src_vocab_size"] is None and args["vocab_size"] == len(dm.tgt_dict)  # joint dictionary
    first = (tmp_path / "test.de").read_text().split("\n")[0]
    assert dm.reference("test", 0) == first  # detokenized round trip of the data-bin target
    src = dm.encode_source((tmp_path / "test.en").read_text().split("\n")[0])
    assert torch.equal(src, dm.datasets["test"].src[0])
    mtime = (tmp_path / ".attnlab-bin/preprocess.json").stat().st_mtime_ns
    Seq2SeqDataModule(str(tmp_path), "en", "de", max_tokens=256).net_args()  # reused, not rebuilt
    assert (tmp_path / ".attnlab-bin/preprocess.json").stat().st_mtime_ns == mtime
