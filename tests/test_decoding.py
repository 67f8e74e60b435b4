"""attnlab.decoding and prefill: prefill = stepping (float64, every decoder-capable variant, with padding), the
preallocated KV cache, beam search = exhaustive search when the beam covers everything, beam 1 = greedy, cached =
recomputed beam search for every variant, sampling filters, generate()."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.attention import build_attention
from attnlab.attention.checks import prefill_vs_steps, random_padding
from attnlab.attention.softmax import MIN_CAPACITY
from attnlab.decoding import Recompute, beam_search, filter_logits, greedy, sample
from attnlab.transformer import TransformerDecoder, TransformerSeq2Seq

# options that make the parallel form and the step form the same function: top-k smaller than the prompts, LSH
# with several rounds but a chunk window holding every bucket
OPTIONS = {"softmax": {}, "linear": {}, "memsizer": {"k": 8}, "topk": {"k": 3},
           "reformer": {"n_hashes": 2, "n_buckets": 4, "chunk_size": 64}, "performer": {"nb_features": 16}}
DECODERS = list(OPTIONS)
PAD, EOS = 0, 1


@pytest.mark.parametrize("name", [*DECODERS, "linformer"])
@pytest.mark.parametrize("role", ["decoder", "cross"])
def test_attention_prefill_matches_steps(name, role):
    """Prefill in one or two chunks (the second from a state that already holds keys), then steps, = stepping."""
    try:
        attn = build_attention({"name": name, **OPTIONS.get(name, {})}, role, d_model=24, n_heads=3, max_len=16)
    except ValueError:  # the variant has no such role (reformer cross, linformer decoder)
        pytest.skip(f"{name} has no {role} role")
    torch.manual_seed(0)
    for bounds, (side, padding) in itertools.product([(0,), (6,), (9,), (3, 7)],
                                                     [("right", True), ("left", True), ("right", False)]):
        assert prefill_vs_steps(attn, T=9, bounds=bounds, side=side, padding=padding) <= 1e-10, (bounds, side)


def lm(name, vocab=7, max_len=16, seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerDecoder({"name": name, **OPTIONS[name]}, vocab_size=vocab, max_len=max_len, d_model=16,
                              n_layers=2, n_heads=2, dropout=0.0, **kw).double().eval()


def seq2seq(name, vocab=7, seed=0):
    torch.manual_seed(seed)
    if name == "linformer":  # no causal form: encoder and cross-attention only
        cfg = {"name": "linformer", "k": 4, "decoder": {"name": "softmax"}}
    else:
        cfg = {"name": name, **OPTIONS[name], **({"cross": {"name": "softmax"}} if name == "reformer" else {})}
    return TransformerSeq2Seq(cfg, vocab_size=vocab, max_source_len=16, max_target_len=16, d_model=16,
                              encoder_layers=1, decoder_layers=2, n_heads=2, dropout=0.0).double().eval()


@pytest.mark.parametrize("name", DECODERS)
def test_model_prefill_matches_steps_and_parallel(name):
    """Whole model: prefill logits = parallel logits; prefill of a left-padded prompt, then steps, = steps only."""
    model = lm(name)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 7, (3, 10), generator=g)
    mask = random_padding(3, 10, g, side="left")
    mask[:, 6:] = False  # the prompt is the first 6 columns, left-padded; then 4 steps
    state = model.init_state(3)
    steps = torch.stack([model.step(tokens[:, t], state, pad=mask[:, t]) for t in range(10)], 1)
    state = model.init_state(3)
    pre = model.prefill(tokens[:, :6], state, mask[:, :6])
    after = torch.stack([model.step(tokens[:, t], state) for t in range(6, 10)], 1)
    valid = ~mask
    got = torch.cat([pre, after], 1)
    assert ((got - steps)[valid].norm() / steps[valid].norm()).item() <= 1e-10
    parallel = model(tokens, key_padding_mask=mask)
    assert ((got - parallel)[valid].norm() / parallel[valid].norm()).item() <= 1e-10
    assert state["pos"] == 10


def test_kv_cache_is_preallocated_doubles_and_reorders():
    attn = build_attention({"name": "softmax"}, "decoder", 16, 2).double().eval()
    x = torch.randn(3, 40, 16, dtype=torch.float64)
    state, caps, ptrs = attn.init_state(3), [], set()
    for t in range(40):
        _, state = attn.step(x[:, t:t + 1], state)
        caps.append(state["k"].shape[2])
        ptrs.add(state["k"].data_ptr())
    assert state["length"] == 40 and caps[0] == MIN_CAPACITY
    assert sorted(set(caps)) == [MIN_CAPACITY, 2 * MIN_CAPACITY, 4 * MIN_CAPACITY]
    assert len(ptrs) == 3  # a new buffer only when the capacity doubles: steps write in place
    assert state["pad"][:, 40:].all() and not state["pad"][:, :40].any()  # unwritten slots are masked
    # reorder, then continue: = the reordered sequences decoded from scratch
    idx = torch.tensor([2, 0, 2])
    y, _ = attn.step(x[:, :1], state.reorder(idx))
    ref_state = attn.init_state(3)
    _, ref_state = attn.prefill(x[idx], ref_state)
    y_ref, _ = attn.step(x[:, :1], ref_state)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)


def test_reserved_cache_is_static_and_changes_nothing():
    model = lm("softmax", max_len=48)
    tokens = torch.randint(2, 7, (2, 40))
    state = model.reserve_state(model.init_state(2), 40)
    caches = [states[0] for states in state["layers"]]
    ptrs = [c["k"].data_ptr() for c in caches]
    assert all(c["k"].shape[2] == 64 and c["length"] == 0 for c in caches)  # 16 doubled until it holds 40
    logits = torch.cat([model.prefill(tokens[:, :10], state)] +
                       [model.step(tokens[:, t], state)[:, None] for t in range(10, 40)], 1)
    assert [c["k"].data_ptr() for c in caches] == ptrs and all(c["length"] == 40 for c in caches)
    torch.testing.assert_close(logits, model(tokens), rtol=0, atol=1e-10)
    prefix = tokens[:, :5]
    assert torch.equal(greedy(model, prefix, 30), greedy(Recompute(model), prefix, 30))


def exhaustive(model, prefix, max_len, min_len, lenpen, memory=None, memory_mask=None):
    """Every hypothesis (tokens 2..V-1, then EOS; min_len..max_len tokens before EOS) scored by the parallel form."""
    V = model.vocab_size if hasattr(model, "vocab_size") else model.decoder.vocab_size
    out = []
    for n in range(min_len, max_len + 1):
        for body in itertools.product(range(2, V), repeat=n):
            hyp = torch.tensor([*body, EOS])
            inp = torch.cat([prefix, hyp[:-1]])[None]
            logits = model(inp) if memory is None else model.decoder(inp, None, memory, memory_mask)
            lp = F.log_softmax(logits[0, len(prefix) - 1:], -1).gather(1, hyp[:, None])[:, 0]
            out.append((lp.sum().item() / len(hyp) ** lenpen, hyp))
    return sorted(out, key=lambda s: -s[0])


@pytest.mark.parametrize("lenpen", [0.0, 1.0, 2.5])
def test_beam_covering_everything_equals_exhaustive_search(lenpen):
    """Vocabulary {pad, eos, 2, 3}: with min_len 1 and max_len 3 there are 14 hypotheses; a beam of 16 keeps them
    all, so its n-best must be the exhaustive n-best (tokens and length-normalised scores)."""
    model = lm("softmax", vocab=4, seed=3)
    prefix = torch.tensor([[EOS, 2, 3], [EOS, 3, 3]])
    hyps = beam_search(model, prefix, eos=EOS, pad=PAD, beam_size=16, max_len_b=3, min_len=1, lenpen=lenpen,
                       nbest=14)
    for b in range(2):
        ref = exhaustive(model, prefix[b], 3, 1, lenpen)
        assert len(hyps[b]) == len(ref) == 14
        for h, (score, toks) in zip(hyps[b], ref):
            assert torch.equal(h.tokens, toks)
            assert math.isclose(h.score, score, rel_tol=1e-10, abs_tol=1e-12)
            assert math.isclose(h.positional_scores.sum().item() / len(toks) ** lenpen, score, rel_tol=1e-10)
    # a seq2seq model, source padding, src-length-dependent max_len (0.5 * 4 + 1 = 3)
    model = seq2seq("linear", vocab=4, seed=4)
    src = torch.tensor([[2, 3, 3, 2], [3, 2, 0, 0]])
    mask = src == PAD
    memory = model.encode(src, mask)
    hyps = beam_search(model, torch.full((2, 1), EOS), eos=EOS, pad=PAD, beam_size=16, max_len_a=0.5, max_len_b=1,
                       src_len=4, lenpen=lenpen, nbest=5, memory=memory, memory_padding_mask=mask)
    for b in range(2):
        ref = exhaustive(model, torch.tensor([EOS]), 3, 1, lenpen, memory[b:b + 1], mask[b:b + 1])[:5]
        assert [h.tokens.tolist() for h in hyps[b]] == [t.tolist() for _, t in ref]
        assert all(math.isclose(h.score, s, rel_tol=1e-10) for h, (s, _) in zip(hyps[b], ref))


def test_beam_of_one_is_greedy():
    model = lm("linear", vocab=9, seed=5)
    prefix = torch.tensor([[EOS, 4], [EOS, 7], [EOS, 2], [EOS, 5]])
    for max_len in (3, 8):
        hyps = beam_search(model, prefix, eos=EOS, pad=PAD, beam_size=1, max_len_b=max_len, min_len=0, lenpen=0.0)
        g = greedy(model, prefix, max_len + 1, eos=EOS, pad=PAD)
        lp_sum = torch.zeros(4, dtype=torch.float64)
        logits = model(torch.cat([prefix, g], 1))[:, prefix.shape[1] - 1:]
        for b in range(4):
            row = g[b].tolist()
            n = row.index(EOS) + 1 if EOS in row else max_len  # greedy ran on; beam search forced EOS
            assert hyps[b][0].tokens[:n].tolist() == row[:n], (max_len, b)
            lp_sum[b] = F.log_softmax(logits[b, :n], -1).gather(1, g[b, :n, None]).sum()
            if EOS not in row[:n]:
                assert hyps[b][0].tokens.tolist() == row[:n] + [EOS]
            else:
                assert math.isclose(hyps[b][0].score, lp_sum[b].item(), rel_tol=1e-10)


@pytest.mark.parametrize("name", [*DECODERS, "linformer"])
def test_cached_beam_search_equals_recomputation(name):
    """Beam search on each variant's recurrent state = beam search re-running the parallel form every step:
    seq2seq with source padding and a forced target prefix, and (decoder-capable variants) a language model with left-padded prompts."""
    model = seq2seq(name, vocab=8, seed=6)
    g = torch.Generator().manual_seed(7)
    src = torch.randint(2, 8, (3, 6), generator=g)
    mask = random_padding(3, 6, g)
    memory = model.encode(src, mask)
    kw = dict(eos=EOS, pad=PAD, beam_size=3, max_len_a=1.0, max_len_b=2, src_len=6, lenpen=1.0, nbest=3,
              memory=memory, memory_padding_mask=mask)
    tgt_prefix = torch.cat([torch.full((3, 1), EOS), torch.randint(2, 8, (3, 2), generator=g)], 1)  # forced
    runs = [(beam_search(model, tgt_prefix, **kw), beam_search(Recompute(model.decoder), tgt_prefix, **kw))]
    if name != "linformer":
        net = lm(name, vocab=8, seed=8)
        prefix = torch.randint(2, 8, (3, 5), generator=g)
        pmask = torch.tensor([[False] * 5, [True] * 2 + [False] * 3, [True] * 4 + [False]])
        kw = dict(eos=EOS, pad=PAD, beam_size=4, max_len_b=7, lenpen=0.7, nbest=4, prefix_padding_mask=pmask)
        runs.append((beam_search(net, prefix, **kw), beam_search(Recompute(net), prefix, **kw)))
    for cached, recomputed in runs:
        for a, b in zip(cached, recomputed):
            assert [h.tokens.tolist() for h in a] == [h.tokens.tolist() for h in b]
            assert all(math.isclose(x.score, y.score, rel_tol=1e-9) for x, y in zip(a, b))
            assert all(torch.allclose(x.positional_scores, y.positional_scores, rtol=1e-9, atol=1e-12)
                       for x, y in zip(a, b))


def test_max_len_min_len_and_pad():
    model = lm("softmax", vocab=6, seed=9)
    prefix = torch.full((3, 1), EOS)
    hyps = beam_search(model, prefix, eos=EOS, pad=PAD, beam_size=4, max_len_a=0.5, max_len_b=1, src_len=4,
                       min_len=2, nbest=4, lenpen=1.0)
    for sent in hyps:
        assert [h.score for h in sent] == sorted((h.score for h in sent), reverse=True)
        for h in sent:  # max_len = 0.5 * 4 + 1 = 3 tokens before EOS, at least min_len = 2
            assert 3 <= len(h.tokens) <= 4 and h.tokens[-1] == EOS and PAD not in h.tokens[:-1].tolist()
            assert EOS not in h.tokens[:-1].tolist()
    # the model's positions cap max_len: a 14-token prompt in a max_len=16 model leaves 2
    long = torch.randint(2, 6, (2, 14))
    assert all(len(h.tokens) <= 3 for s in beam_search(model, long, eos=EOS, beam_size=2, max_len_b=50) for h in s)
    with pytest.raises(ValueError, match="no room"):
        beam_search(model, prefix, eos=EOS, max_len_b=2, min_len=3)


def test_filter_logits_top_k_and_nucleus():
    logits = torch.tensor([[0.15, 0.5, 0.1, 0.25]]).log()
    keep = lambda lg=logits, **kw: filter_logits(lg, **kw).isfinite()[0].tolist()  # noqa: E731
    assert keep(top_k=2) == [False, True, False, True]
    assert keep(torch.tensor([[0.5, 0.2, 0.2, 0.1]]).log(), top_k=2) == [True, True, True, False]  # ties kept
    assert keep(top_p=0.5) == [False, True, False, False]  # the most probable token alone reaches 0.5
    assert keep(top_p=0.6) == [False, True, False, True]   # 0.5 < 0.6 <= 0.75
    assert keep(top_p=0.8) == [True, True, False, True]    # 0.75 < 0.8 <= 0.9
    assert keep(top_p=1.0) == [True] * 4 and keep(top_k=3, top_p=0.99) == [True, True, False, True]
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)
    for bad in ({"temperature": 0.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            filter_logits(logits, **bad)


def test_sampling_is_reproducible_and_respects_its_filters():
    model = lm("memsizer", vocab=9, seed=10)
    prefix = torch.tensor([[EOS, 3], [EOS, 5]])
    draw = lambda seed, **kw: sample(model, prefix, 6, generator=torch.Generator().manual_seed(seed), **kw)  # noqa
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(2, top_k=1), greedy(model, prefix, 6))
    assert torch.equal(draw(3, top_p=1e-6), greedy(model, prefix, 6))
    # top_k=2: every sampled token is one of the two most probable after its own prefix
    toks = torch.cat([prefix.repeat(20, 1), sample(model, prefix.repeat(20, 1), 6, top_k=2, temperature=3.0,
                                                   generator=torch.Generator().manual_seed(5))], 1)
    top2 = model(toks)[:, 1:-1].topk(2, -1).indices
    assert (top2 == toks[:, 2:, None]).any(-1).all()
    # EOS ends a row; pad fills it and is never sampled
    out = sample(model, prefix.repeat(30, 1), 8, temperature=5.0, eos=EOS, pad=PAD,
                 generator=torch.Generator().manual_seed(6))
    for row in out.tolist():
        n = row.index(EOS) + 1 if EOS in row else len(row)
        assert PAD not in row[:n] and all(t == PAD for t in row[n:])


def test_generate_uses_the_library_and_rejects_an_empty_prefix():
    model = lm("performer", vocab=9, seed=11)
    prefix = torch.tensor([[EOS, 3, 4], [EOS, 5, 2]])
    out = model.generate(prefix, 5)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], prefix)
    ref = prefix
    for _ in range(5):  # argmax of the parallel form, one token at a time
        ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)
    a = model.generate(prefix, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = model.generate(prefix, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="prompt `prefix`"):
        model.generate(prefix[:, :0], 5)
    with pytest.raises(ValueError, match="LEFT-padded"):
        greedy(model, prefix, 2, prefix_padding_mask=torch.tensor([[False, False, True], [False] * 3]))
