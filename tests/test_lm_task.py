"""Language modelling task: blocks, sliding-window perplexity (against prefill with the decoding library and against
a hand computation), and fast_dev_run of task=lm on raw text binarized by preprocess."""
import math

import pytest
import torch
from torch import nn

from attnlab.modules.lm import LMModule
from attnlab.tasks.fairseq_data import Dictionary
from attnlab.tasks.language_model import BlockDataset, LMDataModule, WindowDataset, make_collate
from attnlab.train import run
from attnlab.transformer import TransformerDecoder

SOFTMAX = {"name": "softmax", "dropout": 0.0, "bias": True, "encoder": {}, "decoder": {}, "cross": {}}


def test_blocks_and_windows_score_every_prediction_once():
    stream = torch.arange(100, 141)  # 41 tokens, 40 predictions
    blocks = BlockDataset(stream, 8)
    assert len(blocks) == 5
    x, y = blocks[2]
    assert torch.equal(x, stream[16:24]) and torch.equal(y, stream[17:25])
    for L, S in [(8, 8), (8, 3), (8, 1), (40, 7), (50, 50)]:
        w = WindowDataset(stream, L, S)
        scored = []
        for k in range(len(w)):
            x, y = w[k]
            assert len(x) == len(y) <= L and torch.equal(y[y != -100], stream[1:][k * S: k * S + len(x)][y != -100])
            pos = [k * S + i for i in range(len(y)) if y[i] != -100]
            if k > 0:  # a later window scores at most S predictions, each with >= L - S tokens of context
                assert len(pos) <= S and pos[0] - k * S >= L - S
            scored += pos
        assert scored == list(range(40)), (L, S)


class FixedDistribution(nn.Module):
    """A 'language model' whose next-token distribution is p whatever the input."""

    def __init__(self, p):
        super().__init__()
        self.register_buffer("logp", torch.log(p))

    def forward(self, tokens):
        return self.logp.expand(*tokens.shape, -1)


def _module(net):
    return LMModule(net, optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3})


def _eval_ppl(module, dataset, pad=1, batch_size=3):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=make_collate(pad))
    for batch in loader:
        module.evaluate(batch, "val")
    loss = module.metrics["val"]["loss"].compute()
    return float(module.derived({"loss": loss})["ppl"]), float(loss)


def test_perplexity_of_a_known_distribution():
    V = 6
    p = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.25, 0.35], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    stream = torch.multinomial(p, 200, replacement=True, generator=g)
    ppl, _ = _eval_ppl(_module(FixedDistribution(p)), WindowDataset(stream, 16, 5))
    want = math.exp(-sum(math.log(p[int(t)]) for t in stream[1:]) / 199)  # every prediction but the first token
    assert ppl == pytest.approx(want, rel=1e-6)  # LMModule scores in float32
    uniform = torch.full((V,), 1.0 / V, dtype=torch.float64)
    assert _eval_ppl(_module(FixedDistribution(uniform)), WindowDataset(stream, 16, 16))[0] == pytest.approx(V)


def _tiny_lm(vocab, max_len):
    torch.manual_seed(0)
    return TransformerDecoder(SOFTMAX, vocab, max_len, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                              dropout=0.0).double().eval()


def test_sliding_window_equals_prefill_of_context_then_block():
    """Each window's scored block, conditioned on its context through the decoding interface (prefill the context,
    then the block, as generation would), gives the loss the task's parallel evaluation logs."""
    V, L, S = 11, 12, 5
    stream = torch.randint(4, V, (60,), generator=torch.Generator().manual_seed(1))
    net = _tiny_lm(V, L)
    windows = WindowDataset(stream, L, S)
    _, loss = _eval_ppl(_module(net), windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(len(windows)):
            x, y = windows[k]
            c = int((y == -100).sum())  # context: the unscored head of the window
            state = net.init_state(1)
            if c:
                net.prefill(x[None, :c], state)
            logits = net.prefill(x[None, c:], state)[0]
            total += float(nn.functional.cross_entropy(logits, y[c:], reduction="sum"))
            count += len(y) - c
    assert count == len(stream) - 1
    assert loss == pytest.approx(total / count, rel=1e-6)
    # a window that covers the whole text: one full-context pass over it, whatever the stride
    full_net = _tiny_lm(V, 64)
    with torch.no_grad():
        full = float(nn.functional.cross_entropy(full_net(stream[None, :-1])[0], stream[1:]))
    for stride in (7, 64):
        assert _eval_ppl(_module(full_net), WindowDataset(stream, 64, stride))[1] == pytest.approx(full, rel=1e-6)


def test_raw_text_is_binarized_word_level(raw_text_dir):
    dm = LMDataModule(str(raw_text_dir), tokens_per_sample=16, batch_size=4)
    args = dm.net_args()
    d = Dictionary.load(raw_text_dir / ".attnlab-bin/dict.txt")
    assert args == {"vocab_size": len(d), "max_len": 16}
    first = (raw_text_dir / "train.txt").read_text().split("\n")[0]
    assert d.string(dm.streams["train"][: len(first.split()) + 1]) == first  # words, then eos at the line end
    with pytest.raises(Exception, match="eval_stride"):
        LMDataModule(str(raw_text_dir), tokens_per_sample=16, batch_size=4, eval_stride=17)


@pytest.mark.parametrize("attention", [["attention=softmax"], ["attention=linear"],
                                       ["attention=memsizer", "attention.decoder.k=4"], ["attention=topk"],
                                       ["attention=reformer"], ["attention=reformer_lsh4"], ["attention=performer"]],
                         ids=lambda a: a[0])  # every causal variant (Linformer has none)
def test_fast_dev_run_lm(compose_cfg, raw_text_dir, tmp_path, attention):
    cfg = compose_cfg(["task=lm", *attention, f"task.data_dir={raw_text_dir}", "task.tokens_per_sample=16",
                       "task.batch_size=4", "task.eval_stride=8", "model.net.d_model=16", "model.net.n_heads=2",
                       "model.net.d_ff=32", "model.net.n_layers=1", "logger=none", "trainer.fast_dev_run=true",
                       "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"], out=tmp_path / "run")
    m = run(cfg)["metrics"]
    assert 1 < m["test/ppl"] < 1e4 and m["test/ppl"] == pytest.approx(math.exp(m["test/loss"]), rel=1e-5)


def test_hugging_face_dataset_on_disk_is_read_word_level(tmp_path):
    datasets = pytest.importorskip("datasets")
    text = {"train": ["in the beginning", "god created heaven"], "validation": ["the beginning"], "test": ["god"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in text.items()}).save_to_disk(
        str(tmp_path / "wiki"))
    dm = LMDataModule(str(tmp_path / "wiki"), tokens_per_sample=4, batch_size=2)  # format auto: detected
    dm.net_args()
    d = dm.dictionary
    assert d.string(dm.streams["val"]) == "the beginning" and d.string(dm.streams["test"]) == "god"
    assert len(dm.streams["train"]) == 3 + 1 + 3 + 1  # words and an eos per line
