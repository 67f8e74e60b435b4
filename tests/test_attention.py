"""Softmax and linear attention: parallel vs recurrent forms, masks, shapes, the registry's errors."""
import pytest
import torch

from attnlab.kernels.linear_attn import linear_attention_chunked_torch, linear_attention_ref
from attnlab.attention import ConfigError, build_attention, role_options
from attnlab.attention.checks import parallel_vs_recurrent, random_padding
from attnlab.transformer import TransformerDecoder, TransformerSeq2Seq


@pytest.mark.parametrize("name", ["softmax", "linear"])
@pytest.mark.parametrize("role", ["decoder", "cross"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("T", [1, 9])
def test_parallel_matches_recurrent(name, role, side, T):
    torch.manual_seed(T)
    attn = build_attention({"name": name}, role, d_model=24, n_heads=3)
    assert parallel_vs_recurrent(attn, T=T, side=side, seed=T) <= 1e-10


@pytest.mark.parametrize("T", [1, 7, 64, 65, 200])
def test_linear_chunked_matches_cumsum_reference(T):
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, T, 5, generator=g, dtype=torch.float64)
    mask = random_padding(2, T, g)
    ref = linear_attention_ref(q, k, v, True, key_padding_mask=mask)
    out = linear_attention_chunked_torch(q, k, v, True, key_padding_mask=mask, chunk=16)
    assert (out - ref).norm() / ref.norm() <= 1e-12


@pytest.mark.parametrize("name", ["softmax", "linear"])
def test_padded_keys_are_ignored(name):
    attn = build_attention({"name": name}, "encoder", 16, 2).double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 4:] = True
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16, dtype=torch.float64) * 10
    torch.testing.assert_close(attn(x, None, mask)[:, :4], attn(x2, None, mask)[:, :4], rtol=0, atol=1e-12)


def test_bidirectional_sees_the_future_and_causal_does_not():
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    for name in ["softmax", "linear"]:
        dec = build_attention({"name": name}, "decoder", 16, 2).double()
        enc = build_attention({"name": name}, "encoder", 16, 2).double()
        enc.load_state_dict(dec.state_dict())
        assert torch.equal(dec(x)[:, :4], dec(x2)[:, :4])
        assert not torch.allclose(enc(x)[:, :4], enc(x2)[:, :4])


def test_state_reorder_for_beam_search():
    attn = build_attention({"name": "linear"}, "decoder", 16, 2)
    state = attn.init_state(3)
    _, state = attn.step(torch.randn(3, 1, 16), state)
    idx = torch.tensor([2, 2, 0])
    new = state.reorder(idx)
    assert torch.equal(new["S"][0], state["S"][2]) and torch.equal(new["z"][2], state["z"][0])


def test_linear_state_is_constant_in_length():
    attn = build_attention({"name": "linear"}, "decoder", 16, 2)
    state = attn.init_state(2)
    sizes = set()
    for _ in range(20):
        _, state = attn.step(torch.randn(2, 1, 16), state)
        sizes.add(sum(t.numel() for t in state.values()))
    assert len(sizes) == 1


def test_shape_and_mask_errors_name_the_problem():
    attn = build_attention({"name": "softmax"}, "cross", 16, 2)
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with pytest.raises(ValueError, match="memory"):
        attn(x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(x, mem, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(batch, time, 16\)"):
        attn(torch.randn(2, 5, 8), mem)


def test_registry_errors_and_role_overrides():
    with pytest.raises(ConfigError, match="available"):
        build_attention({"name": "nope"}, "decoder", 16, 2)
    with pytest.raises(ConfigError, match="no option"):
        build_attention({"name": "linear", "temperature": 2.0}, "decoder", 16, 2)
    cfg = {"name": "linear", "eps": 1e-3, "dropout": 0.1, "cross": {"name": "softmax"}, "decoder": {"eps": 1e-4}}
    assert role_options(cfg, "decoder") == ("linear", {"eps": 1e-4, "dropout": 0.1})
    assert role_options(cfg, "cross") == ("softmax", {"dropout": 0.1})  # another variant: shared options only
    model = TransformerSeq2Seq(cfg, vocab_size=11, max_source_len=16, max_target_len=16, d_model=16, encoder_layers=1, decoder_layers=1,
                               n_heads=2)
    layer = model.decoder.stack.layers[0]
    assert (layer.self_attn.name, layer.cross_attn.name, model.encoder.stack.layers[0].self_attn.name) == \
        ("linear", "softmax", "linear")


def test_sequence_longer_than_model_is_an_error():
    model = TransformerDecoder({"name": "linear"}, vocab_size=5, max_len=8, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="longer than the model allows"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("name", ["softmax", "linear"])
def test_model_generate_matches_parallel_logits(name):
    """The decoder's recurrent form (all layers, positions, norms) gives the parallel form's logits."""
    torch.manual_seed(0)
    model = TransformerDecoder({"name": name}, vocab_size=7, max_len=12, d_model=16, n_layers=2, n_heads=2,
                               dropout=0.0).double().eval()
    tokens = torch.randint(0, 7, (3, 10))
    parallel = model(tokens)
    state = model.init_state(3)
    steps = torch.stack([model.step(tokens[:, t], state) for t in range(10)], 1)
    assert ((parallel - steps).norm() / parallel.norm()).item() <= 1e-10


def test_seq2seq_recurrent_matches_parallel_with_source_padding():
    torch.manual_seed(0)
    for name in ["softmax", "linear"]:
        model = TransformerSeq2Seq({"name": name}, vocab_size=9, max_source_len=12, max_target_len=12, d_model=16, encoder_layers=1,
                                   decoder_layers=2, n_heads=2, dropout=0.0).double().eval()
        src, tgt = torch.randint(0, 9, (3, 7)), torch.randint(0, 9, (3, 5))
        src_mask = random_padding(3, 7, torch.Generator().manual_seed(1))
        parallel = model(src, tgt, src_padding_mask=src_mask)
        memory = model.encoder(src, src_mask)
        state = model.decoder.init_state(3, memory, src_mask)
        steps = torch.stack([model.decoder.step(tgt[:, t], state) for t in range(5)], 1)
        assert ((parallel - steps).norm() / parallel.norm()).item() <= 1e-10
