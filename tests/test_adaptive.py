"""Adaptive input and adaptive softmax (attnlab.adaptive): exact distributions (float64), the cheap NLL = the full one
in value and gradient, argmax without the full matrix, tying, argument errors, decoding through a decoder that has
both (prefill = steps = parallel), the LM module's exact loss, and fast_dev_run of task=lm with them."""
import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.adaptive import AdaptiveInput, AdaptiveSoftmax
from attnlab.attention import ConfigError
from attnlab.attention.checks import random_padding
from attnlab.decoding import Recompute, greedy
from attnlab.modules.lm import LMModule
from attnlab.train import build, run
from attnlab.transformer import TransformerDecoder

V, D = 53, 16
CASES = [([11], 4), ([5, 20], 2), ([1, 2, 40], 2), ([30], 1.5)]  # cutoffs, factor (fairseq allows a float factor)


def softmax(cutoffs, factor, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return AdaptiveSoftmax(V, D, cutoffs, factor, dropout).double()


def targets_in_every_band(shape, cutoffs, g):
    """Random targets with every band's edges present and some positions ignored (-100)."""
    t = torch.randint(0, V, shape, generator=g).flatten()
    edges = sorted({0, V - 1, *cutoffs, *(c - 1 for c in cutoffs)})
    t[: len(edges)] = torch.tensor(edges)
    t[len(edges)::5] = -100
    return t.view(shape)


@pytest.mark.parametrize("cutoffs, factor", CASES)
def test_log_prob_is_a_distribution_and_nll_and_argmax_match_it(cutoffs, factor):
    sm = softmax(cutoffs, factor).eval()
    g = torch.Generator().manual_seed(1)
    for shape in [(7,), (3, 5), (2, 1, 9)]:  # odd shapes, several leading dimensions
        h = 3 * torch.randn(*shape, D, dtype=torch.float64, generator=g)
        lp = sm.log_prob(h)
        assert lp.shape == (*shape, V)
        torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(shape, dtype=torch.float64), rtol=0, atol=1e-12)
        t = targets_in_every_band(shape, cutoffs, g)
        keep = t != -100
        want = torch.where(keep, -lp.gather(-1, t.clamp_min(0)[..., None])[..., 0], 0.0)
        nll = sm.nll(h, t)
        assert nll.shape == shape
        torch.testing.assert_close(nll, want, rtol=0, atol=1e-12)
        ce = F.cross_entropy(lp.reshape(-1, V), t.flatten(), ignore_index=-100, reduction="sum")
        assert float(nll.sum().detach()) == pytest.approx(float(ce.detach()), rel=1e-12)
        assert torch.equal(sm.predict(h), lp.argmax(-1))
    assert sm.nll(h, torch.full(shape, -100)).abs().sum() == 0  # all ignored


@pytest.mark.parametrize("tied", [False, True])
def test_cheap_path_gradients_equal_full_path(tied):
    torch.manual_seed(0)
    sm = AdaptiveSoftmax(V, D, [5, 20], 2).double()
    if tied:
        sm.tie(AdaptiveInput(V, D, [5, 20], 2).double(), proj=True)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, 6, D, dtype=torch.float64, generator=g, requires_grad=True)
    t = targets_in_every_band((4, 6), [5, 20], g)
    t[t >= 20] = 7  # the last cluster gets no target: it still takes part, with zero gradient
    params = [h, *sm.parameters()]
    cheap = torch.autograd.grad(sm.nll(h, t).sum(), params)
    full = torch.autograd.grad(F.cross_entropy(sm.log_prob(h).reshape(-1, V), t.flatten(), reduction="sum"), params)
    for a, b in zip(cheap, full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert cheap[-1].abs().sum() == 0  # the empty cluster's output matrix: a (zero) gradient all the same


def test_adaptive_input_bands():
    # one band, factor 1: a plain embedding (given its weights and an identity projection)
    torch.manual_seed(0)
    ai, plain = AdaptiveInput(V, D, [], factor=1).double(), torch.nn.Embedding(V, D).double()
    with torch.no_grad():
        ai.embs[0].weight.copy_(plain.weight)
        ai.projs[0].weight.copy_(torch.eye(D))
    tokens = torch.randint(0, V, (3, 11))
    torch.testing.assert_close(ai(tokens), plain(tokens), rtol=0, atol=0)
    # several bands: each token is its band's row, projected; widths D / factor**i; padding row zero
    ai = AdaptiveInput(V, D, [5, 20], factor=2, padding_idx=1).double()
    assert [e.weight.shape for e in ai.embs] == [(5, 16), (15, 8), (33, 4)]
    assert ai.embs[0].weight[1].abs().sum() == 0
    tokens = torch.tensor([[0, 4, 5, 19, 20, 52, 1]])
    want = torch.stack([ai.projs[i](ai.embs[i].weight[int(t) - lo]) for t in tokens[0]
                        for i, (lo, hi) in enumerate([(0, 5), (5, 20), (20, V)]) if lo <= t < hi])
    torch.testing.assert_close(ai(tokens)[0], want, rtol=0, atol=1e-14)


def lm(adaptive, name="softmax", tie=True, seed=0, vocab=V):
    torch.manual_seed(seed)
    opts = {"linear": {}, "softmax": {}, "memsizer": {"k": 8}}[name]
    return TransformerDecoder({"name": name, **opts}, vocab_size=vocab, max_len=16, d_model=D, n_layers=2,
                              n_heads=2, dropout=0.0, tie_embeddings=tie, adaptive=adaptive).double().eval()


ADAPTIVE = {"cutoffs": [5, 20], "factor": 2, "tie_proj": True}


def test_tying_shares_parameters():
    net = lm(ADAPTIVE)
    emb, head = net.embed.tok, net.head
    assert head.head.weight is emb.embs[0].weight
    for i, tail in enumerate(head.tail, 1):
        assert tail[2].weight is emb.embs[i].weight and tail[0].weight is emb.projs[i].weight
        assert tail[0].weight.data_ptr() == emb.projs[i].weight.data_ptr()
    untied = lm({**ADAPTIVE, "tie_proj": False}, tie=False)
    n = sum(p.numel() for p in net.parameters())
    tied_away = sum(e.weight.numel() for e in emb.embs) + sum(p.weight.numel() for p in emb.projs[1:])
    assert sum(p.numel() for p in untied.parameters()) == n + tied_away
    # tie without tie_proj: the bands shared, the projections not
    half = lm({**ADAPTIVE, "tie_proj": False})
    assert half.head.tail[0][2].weight is half.embed.tok.embs[1].weight
    assert half.head.tail[0][0].weight is not half.embed.tok.projs[1].weight


@pytest.mark.parametrize("kwargs, match", [
    ({"cutoffs": [20, 5]}, "strictly increasing"),
    ({"cutoffs": [0, 5]}, "strictly increasing"),
    ({"cutoffs": [5, V]}, rf"model\.net\.adaptive\.cutoffs.*\[{V}\].*vocabulary size {V}"),
    ({"cutoffs": [5, 60000]}, r"model\.net\.adaptive\.cutoffs.*\[60000\].*vocabulary size"),
    ({"cutoffs": [5], "factor": 0.5}, "factor must be >= 1"),
    ({"cutoffs": [5, 20], "factor": 8}, "0 wide"),
    ({"cutoffs": 20000}, "must be a list"),
    ({"cutoffs": [5], "sizes": 3}, "unknown key"),
    ({"cutoffs": [5], "input": False, "softmax": False}, "adaptive=null"),
    ({"cutoffs": [5], "input": False}, "tie_embeddings=false"),
])
def test_bad_options_are_refused_with_the_key_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        lm(kwargs)


def test_tie_proj_needs_tied_weights_and_softmax_needs_a_cutoff():
    with pytest.raises(ConfigError, match="tie_proj"):
        lm({"cutoffs": [5], "tie_proj": True}, tie=False)
    with pytest.raises(ConfigError, match="at least one cutoff"):
        AdaptiveSoftmax(V, D, [])


@pytest.mark.parametrize("name", ["softmax", "linear"])
@pytest.mark.parametrize("adaptive", [ADAPTIVE, {"cutoffs": [11], "input": False}, {"cutoffs": [7, 30],
                                                                                   "softmax": False}],
                         ids=["input+softmax", "softmax", "input"])
def test_decoder_prefill_and_steps_equal_parallel(name, adaptive):
    """As test_decoding's plain-decoder check: prefill of a left-padded prompt, then steps, = steps only = parallel."""
    model = lm(adaptive, name, tie=adaptive is ADAPTIVE)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, V, (3, 10), generator=g)
    tokens[0, :4] = torch.tensor([2, 5, 20, V - 1])  # every band's edge
    mask = random_padding(3, 10, g, side="left")
    mask[:, 6:] = False
    state = model.init_state(3)
    steps = torch.stack([model.step(tokens[:, t], state, pad=mask[:, t]) for t in range(10)], 1)
    state = model.init_state(3)
    pre = model.prefill(tokens[:, :6], state, mask[:, :6])
    after = torch.stack([model.step(tokens[:, t], state) for t in range(6, 10)], 1)
    got, valid = torch.cat([pre, after], 1), ~mask
    assert ((got - steps)[valid].norm() / steps[valid].norm()).item() <= 1e-10
    parallel = model(tokens, key_padding_mask=mask)
    assert ((got - parallel)[valid].norm() / parallel[valid].norm()).item() <= 1e-10
    if adaptive.get("softmax", True):  # log-probabilities: cross-entropy and decoding use them as logits
        torch.testing.assert_close(parallel.logsumexp(-1), torch.zeros(3, 10, dtype=torch.float64))
    prefix = tokens[:, :3]
    assert torch.equal(greedy(model, prefix, 8), greedy(Recompute(model), prefix, 8))


def test_lm_module_loss_and_accuracy_are_exact():
    net = lm(ADAPTIVE)
    module = LMModule(net, optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3})
    g = torch.Generator().manual_seed(3)
    inputs = torch.randint(0, V, (4, 12), generator=g)
    targets = targets_in_every_band((4, 12), ADAPTIVE["cutoffs"], g)
    batch = {"inputs": inputs, "targets": targets}
    with torch.no_grad():
        loss_sum, correct, n = module.token_counts(batch)
        train_sum, train_correct, _ = module.token_counts(batch, train=True)
        lp = net(inputs)
    scored = targets != -100
    assert float(loss_sum) == pytest.approx(float(F.cross_entropy(lp.flatten(0, 1), targets.flatten(),
                                                                  reduction="sum")), rel=1e-6)
    assert int(correct) == int(((lp.argmax(-1) == targets) & scored).sum()) and int(n) == int(scored.sum())
    assert train_correct is None and float(train_sum) == pytest.approx(float(loss_sum), rel=1e-12)


@pytest.mark.parametrize("adaptive", ["{cutoffs:[6,10],factor:2,tie_proj:true,dropout:0.1}",
                                      "{cutoffs:[8],input:false}"], ids=["input+softmax", "softmax"])
def test_fast_dev_run_lm_adaptive(compose_cfg, raw_text_dir, tmp_path, adaptive):
    tie = "true" if "tie_proj" in adaptive else "false"
    cfg = compose_cfg(["task=lm", f"task.data_dir={raw_text_dir}", "task.tokens_per_sample=16", "task.batch_size=4",
                       "task.eval_stride=8", "model.net.d_model=16", "model.net.n_heads=2", "model.net.d_ff=32",
                       "model.net.n_layers=1", f"model.net.adaptive={adaptive}", f"model.net.tie_embeddings={tie}",
                       "logger=none", "trainer.fast_dev_run=true", "trainer.accelerator=cpu",
                       "trainer.enable_progress_bar=false"], out=tmp_path / "run")
    results = run(cfg)
    m = results["metrics"]
    assert 1 < m["test/ppl"] < 1e4 and m["test/ppl"] == pytest.approx(math.exp(m["test/loss"]), rel=1e-5)
    assert 0 <= m["test/acc"] <= 1 and "train/loss" in m and "train/acc" not in m  # accuracy at evaluation only
    _, module, _ = build(cfg)  # the model that ran: adaptive, as configured
    assert isinstance(module.net.head, AdaptiveSoftmax) and results["parameters"] == sum(
        p.numel() for p in module.parameters())
    assert isinstance(module.net.embed.tok, AdaptiveInput) == (tie == "true")


def test_cutoffs_beyond_the_data_vocabulary_are_an_error(compose_cfg, raw_text_dir, tmp_path):
    cfg = compose_cfg(["task=lm", f"task.data_dir={raw_text_dir}", "task.tokens_per_sample=16", "task.batch_size=4",
                       "model.net.d_model=16", "model.net.n_heads=2", "model.net.adaptive={cutoffs:[8,20000]}",
                       "logger=none", "trainer.fast_dev_run=true", "trainer.accelerator=cpu"], out=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model\.net\.adaptive\.cutoffs.*vocabulary size 16"):
        run(cfg)
