"""CUDA-graph decoding (attnlab.decoding.graphs) against eager decoding; the GPU tests run on the device machine."""
import pytest
import torch

from attnlab.decoding import CUDAGraphs, greedy, sample
from attnlab.transformer import TransformerDecoder

VARIANTS = {"linear": {"name": "linear"}, "memsizer": {"name": "memsizer", "decoder": {"k": 8}},
            "performer": {"name": "performer"}, "softmax": {"name": "softmax"}}
GRAPHED = list(VARIANTS)  # every one of these decodes from a CUDA graph
VARIANTS.update(topk={"name": "topk", "k": 4}, reformer={"name": "reformer"})  # these run eagerly (below)


def decoder(variant, device, dtype=torch.float32):
    torch.manual_seed(0)
    net = TransformerDecoder(VARIANTS[variant], vocab_size=37, max_len=64, d_model=32, n_layers=2, n_heads=4,
                             d_ff=64, dropout=0.0)
    return net.to(device, dtype).eval()


def test_positions_from_a_device_tensor_equal_the_slice():
    net = decoder("linear", "cpu")
    for kind in ("learned", "sinusoidal"):
        pos = net.embed.pos if kind == "learned" else type(net.embed.pos)("sinusoidal", 64, 32)
        assert torch.equal(pos(torch.tensor(5), 3), pos(5, 3))
    with pytest.raises(ValueError, match="max_len=64"):
        net.embed.pos(62, 3)


def test_a_softmax_step_takes_its_cache_slot_from_a_device_tensor():
    """What a CUDA-graph replay runs (graphs.py fills the caches' lengths into a device tensor): the same logits and
    the same cache as the eager step, whose length is an int."""
    from attnlab.decoding.graphs import _caches, _leaves
    net = decoder("softmax", "cpu")
    prefix, toks = torch.randint(0, 37, (3, 5)), torch.randint(0, 37, (3, 6))
    with torch.no_grad():
        s1, s2 = (net.reserve_state(net.init_state(3), 12) for _ in range(2))
        net.prefill(prefix, s1), net.prefill(prefix, s2)
        for t in range(toks.shape[1]):
            for s in _caches(s2):
                s["length"] = torch.tensor(s["length"])
            b = net.step(toks[:, t], s2)
            for s in _caches(s2):
                s["length"] = int(s["length"])
            assert torch.equal(net.step(toks[:, t], s1), b)
    assert all(map(torch.equal, _leaves(s1), _leaves(s2))) and _caches(s2)[0]["length"] == 11


def test_on_the_cpu_steps_run_eagerly_and_agree():
    net = decoder("linear", "cpu")
    prefix = torch.randint(0, 37, (3, 4))
    graphs = CUDAGraphs(net)
    assert torch.equal(greedy(graphs, prefix, 10), greedy(net, prefix, 10)) and graphs.captures == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", GRAPHED)
def test_graph_replay_equals_eager_decoding(variant):
    net = decoder(variant, "cuda")
    prefix = torch.randint(0, 37, (5, 7), device="cuda")
    graphs = CUDAGraphs(net, fuse=False)  # (the fused step: tests/test_fused_decode.py, and below)
    # the same kernels in the same order: equal up to the nondeterminism of atomics, which these ops do not use
    assert torch.equal(greedy(graphs, prefix, 40), greedy(net, prefix, 40))
    g1, g2 = (torch.Generator(device="cuda").manual_seed(3) for _ in range(2))
    a = sample(graphs, prefix, 40, temperature=1.0, generator=g1)
    b = sample(net, prefix, 40, temperature=1.0, generator=g2)
    assert torch.equal(a, b)
    assert graphs.captures == 1  # softmax too: the searches reserve its KV cache for the whole length
    with torch.autocast("cuda", torch.bfloat16):  # another precision is another graph
        greedy(graphs, prefix, 3)
    assert graphs.captures == 2
    with torch.autocast("cuda", torch.bfloat16):  # replayed in a later autocast context than it was captured in
        a = greedy(graphs, prefix, 40)
        b = greedy(net, prefix, 40)
    # softmax: 40 tokens reserve a larger KV cache than the 3 before, and a cache of another size is another graph
    assert torch.equal(a, b) and graphs.captures == (3 if variant == "softmax" else 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_full_kv_cache_doubles_eagerly_then_the_step_is_captured_again():
    net = decoder("softmax", "cuda")
    toks = torch.randint(0, 37, (3, 40), device="cuda")
    with torch.no_grad():
        graphs, s, s_ref = CUDAGraphs(net, fuse=False), net.init_state(3), net.init_state(3)  # no reservation
        for t in range(toks.shape[1]):
            assert torch.equal(graphs.step(toks[:, t], s), net.step(toks[:, t], s_ref))
        # capacity 16, then 32, then 64: each full cache takes one eager step; a capture for each size
        assert graphs.captures == 3 and s["layers"][0][0]["length"] == 40
        for variant in ("topk", "reformer"):  # top-k's step reads the written slots only; Reformer's cache grows
            other = decoder(variant, "cuda")
            graphs, s = CUDAGraphs(other, fuse=False), other.reserve_state(other.init_state(3), 40)
            for t in range(5):
                graphs.step(toks[:, t], s)
            assert graphs.captures == 0, variant


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["linear", "memsizer"])
def test_the_fused_step_replayed_equals_eager_decoding(variant):
    """Other kernels (fused.py), so equal up to the order of sums: logits along the same tokens, and greedy tokens
    in float32."""
    from attnlab.decoding import Fused
    net = decoder(variant, "cuda")
    prefix = torch.randint(0, 37, (5, 7), device="cuda")
    graphs = CUDAGraphs(net)
    assert isinstance(graphs.model, Fused)
    assert torch.equal(greedy(graphs, prefix, 40), greedy(net, prefix, 40))
    toks = torch.randint(0, 37, (5, 30), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        s1, s2 = net.init_state(5), graphs.init_state(5)
        for t in range(toks.shape[1]):
            a, b = net.step(toks[:, t], s1), graphs.step(toks[:, t], s2)
            assert ((a.float() - b.float()).norm() / a.float().norm()).item() < 1e-2
    assert graphs.captures == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_reordered_state_is_copied_into_the_graph():
    from attnlab.decoding import beam_search
    net = decoder("linear", "cuda")
    prefix = torch.randint(0, 37, (2, 3), device="cuda")
    a = beam_search(CUDAGraphs(net), prefix, eos=1, beam_size=4, max_len_b=20)
    b = beam_search(net, prefix, eos=1, beam_size=4, max_len_b=20)
    assert [[h.tokens.tolist() for h in x] for x in a] == [[h.tokens.tolist() for h in x] for x in b]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_length_limit_is_still_named():
    net = decoder("linear", "cuda")
    with pytest.raises(ValueError, match="max_len=64"):
        greedy(CUDAGraphs(net), torch.zeros(1, 60, dtype=torch.long, device="cuda"), 10)


def test_only_weights_that_only_linear_reads_are_pre_cast():
    """The dry-run watch picks the projection weights and biases; LayerNorm's, the embedding and a head tied to it
    (read by the embedding lookup too) stay out, since casting those would change what the step computes."""
    from attnlab.decoding.graphs import _LinearOnly
    for tie in (False, True):
        torch.manual_seed(0)
        net = TransformerDecoder({"name": "linear"}, vocab_size=37, max_len=64, d_model=32, n_layers=2, n_heads=4,
                                 d_ff=64, dropout=0.0, tie_embeddings=tie).eval()
        state = net.init_state(3)
        watch = _LinearOnly(net.parameters())
        with torch.no_grad(), watch:
            net.step(torch.zeros(3, dtype=torch.long), state)
        picked = {id(p) for p in watch.result()}
        linear = {id(p) for m in net.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
        tied = {id(net.embed.tok.weight)}
        assert picked == (linear - tied if tie else linear)
        assert not picked & {id(p) for m in net.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
