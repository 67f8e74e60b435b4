"""Top-k attention and the top-k feed-forward layer: chunked custom-autograd versions against their dense
definitions, k >= length against softmax, masks, odd shapes, parallel vs recurrent, checkpoint compatibility."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from attnlab.kernels.topk_attn import topk_attention, topk_attention_chunked, topk_attention_dense
from attnlab.attention import ConfigError, build_attention
from attnlab.attention.checks import parallel_vs_recurrent, random_padding
from attnlab.topk_ffn import TopkFeedForward, TopkFFNFunction, topk_ffn_dense
from attnlab.transformer import FeedForward

ROOT = Path(__file__).resolve().parents[1]
f64 = torch.float64


def qkv(B, H, T, S, d=4, dv=5, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=f64)
    k = torch.randn(B, H, S, d, generator=g, dtype=f64)
    v = torch.randn(B, H, S, dv, generator=g, dtype=f64)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def visible_mask(T, S, causal, kpm):
    """(B or 1, 1, T, S) True where query i may see key j, built independently of the op's own masking."""
    m = torch.ones(T, S, dtype=torch.bool)
    if causal:
        m = m.tril(S - T)
    m = m[None, None]
    return m if kpm is None else m & ~kpm[:, None, None, :]


def saved_numels(fn):
    """Run fn() and return the sizes of every tensor autograd saved for backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


# ---- the op ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,S", [(1, 1), (1, 9), (7, 7), (9, 5), (5, 9), (11, 11)])
@pytest.mark.parametrize("topk", [1, 3, 100])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_matches_dense_values_and_grads(causal, T, S, topk, padded):
    q, k, v = qkv(3, 2, T, S, seed=T * 100 + S, grad=True)
    kpm = random_padding(3, S, torch.Generator().manual_seed(S)) if padded else None
    ref = topk_attention_dense(q, k, v, topk, causal, kpm)
    out = topk_attention_chunked(q, k, v, topk, causal, kpm, chunk_size=4)  # T not a multiple of 4 mostly
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_chunked(causal):
    q, k, v = qkv(1, 2, 5, 6, d=3, dv=2, seed=1, grad=True)
    kpm = torch.tensor([[False, False, False, False, True, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: topk_attention_chunked(q, k, v, 3, causal, kpm, chunk_size=2), (q, k, v))


def test_gradcheck_with_dropout():
    """The dropout mask is saved in forward, so backward must match the finite differences of the same mask
    (re-seeding before every call makes each evaluation draw the same mask)."""
    q, k, v = qkv(1, 2, 5, 6, d=3, dv=2, seed=2, grad=True)

    def f(q, k, v):
        torch.manual_seed(0)
        return topk_attention_chunked(q, k, v, 4, True, None, chunk_size=2, dropout_p=0.4)
    assert torch.autograd.gradcheck(f, (q, k, v))
    assert not torch.allclose(f(q, k, v), topk_attention_chunked(q, k, v, 4, True, None, chunk_size=2))


@pytest.mark.parametrize("causal,T,S,padded", [(True, 9, 9, False), (False, 9, 9, False), (True, 9, 9, True),
                                               (False, 8, 5, True), (True, 4, 10, True), (True, 1, 7, True)])
def test_k_at_least_length_is_softmax_attention(causal, T, S, padded):
    q, k, v = qkv(3, 2, T, S, seed=7)
    kpm = random_padding(3, S, torch.Generator().manual_seed(1), side="left") if padded else None
    allowed = visible_mask(T, S, causal, kpm)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~allowed.any(-1, keepdim=True))
    rows = allowed.any(-1).expand(3, 2, T)                         # queries that see at least one key
    for fn in (topk_attention_dense, topk_attention_chunked):
        out = fn(q, k, v, S, causal, kpm)
        torch.testing.assert_close(out[rows], ref[rows], rtol=0, atol=1e-12)
        assert torch.equal(out[~rows], torch.zeros_like(out[~rows]))  # no visible key: output 0


def test_rows_with_fewer_than_k_keys_keep_all_and_empty_rows_are_zero():
    T = S = 8
    q, k, v = qkv(2, 1, T, S, seed=3, grad=True)
    kpm = torch.zeros(2, S, dtype=torch.bool)
    kpm[1, :3] = True                                   # batch 1: queries 0..2 see only padding
    out = topk_attention_chunked(q, k, v, 4, True, kpm, chunk_size=3)
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=visible_mask(T, S, True, None))
    torch.testing.assert_close(out[0, :, :4], full[0, :, :4], rtol=0, atol=1e-12)  # query i sees i+1 <= 4 keys
    assert torch.equal(out[1, :, :3], torch.zeros_like(out[1, :, :3]))
    ref4 = F.scaled_dot_product_attention(q[1:, :, 3:4], k[1:, :, 3:4], v[1:, :, 3:4])  # query 3 sees key 3 only
    torch.testing.assert_close(out[1:, :, 3:4], ref4, rtol=0, atol=1e-12)
    assert not torch.allclose(out[0, :, 4:], full[0, :, 4:])   # later rows really drop keys
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_backward_saves_only_qkv_and_topk():
    B, H, T, S, topk = 1, 2, 64, 64, 4
    q, k, v = qkv(B, H, T, S, seed=4, grad=True)
    sizes = saved_numels(lambda: topk_attention_chunked(q, k, v, topk, True, None, chunk_size=16))
    assert max(sizes) <= max(q.numel(), k.numel(), v.numel(), B * H * T * topk)
    dense = saved_numels(lambda: topk_attention_dense(q, k, v, topk, True, None))
    assert max(dense) >= B * H * T * S                  # the check above would catch an O(T*S) save


def test_dispatcher_and_errors():
    q, k, v = qkv(2, 2, 5, 5, seed=5)
    assert torch.equal(topk_attention(q, k, v, 2, True, backend="torch"),
                       topk_attention_chunked(q, k, v, 2, True))
    assert torch.equal(topk_attention(q, k, v, 2, True), topk_attention_chunked(q, k, v, 2, True))  # CPU: auto
    with pytest.raises(ValueError, match="backend"):
        topk_attention(q, k, v, 2, True, backend="cuda")
    with pytest.raises(ValueError, match="dropout"):
        topk_attention(q, k, v, 2, True, dropout_p=0.1, backend="triton")
    with pytest.raises(ValueError, match="topk must be a positive int"):
        topk_attention_chunked(q, k, v, 0, True)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        topk_attention_chunked(q, k, v, 2, True, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="shapes do not match"):
        topk_attention_dense(q, k[:, :, :, :3], v, 2, True)
    with pytest.raises(ValueError, match="chunk_size"):
        topk_attention_chunked(q, k, v, 2, True, chunk_size=0)


# ---- the module -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["decoder", "cross"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("T", [1, 9])
@pytest.mark.parametrize("topk", [3, 64])
def test_parallel_matches_recurrent(role, side, T, topk):
    torch.manual_seed(T)
    attn = build_attention({"name": "topk", "k": topk, "chunk_size": 4}, role, d_model=24, n_heads=3)
    assert parallel_vs_recurrent(attn, T=T, side=side, seed=T) <= 1e-10


@pytest.mark.parametrize("role", ["encoder", "decoder", "cross"])
def test_loads_softmax_checkpoint_and_equals_it_when_k_covers_all_keys(role):
    torch.manual_seed(0)
    soft = build_attention({"name": "softmax"}, role, 16, 2).double().eval()
    topk = build_attention({"name": "topk", "k": 64, "chunk_size": 3}, role, 16, 2).double().eval()
    topk.load_state_dict(soft.state_dict(), strict=True)
    x = torch.randn(3, 7, 16, dtype=f64)
    mem = torch.randn(3, 5, 16, dtype=f64) if role == "cross" else None
    kpm = random_padding(3, 5 if role == "cross" else 7, torch.Generator().manual_seed(2))  # right: no empty rows
    torch.testing.assert_close(topk(x, mem, kpm), soft(x, mem, kpm), rtol=0, atol=1e-12)
    small = build_attention({"name": "topk", "k": 2}, role, 16, 2).double().eval()
    small.load_state_dict(soft.state_dict(), strict=True)
    assert not torch.allclose(small(x, mem, kpm), soft(x, mem, kpm))


def test_config_file_builds_every_role_and_options_are_checked():
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/attention/topk.yaml"))
    cfg["decoder"] = {"k": 4}
    for role in ["encoder", "decoder", "cross"]:
        attn = build_attention(cfg, role, 16, 2)
        assert attn.topk == (4 if role == "decoder" else 64) and attn.chunk_size == 1024
    with pytest.raises(ConfigError, match="positive int"):
        build_attention({"name": "topk", "k": 0}, "decoder", 16, 2)
    with pytest.raises(ConfigError, match="backend"):
        build_attention({"name": "topk", "backend": "cuda"}, "decoder", 16, 2)


def test_module_dropout_train_vs_eval_and_finite_grads():
    torch.manual_seed(0)
    attn = build_attention({"name": "topk", "k": 3, "dropout": 0.3, "chunk_size": 4}, "decoder", 16, 2)
    x = torch.randn(2, 9, 16, requires_grad=True)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, :4] = True                                   # left padding: empty rows in float32
    y1, y2 = attn(x, None, kpm), attn(x, None, kpm)
    assert not torch.allclose(y1, y2)                   # dropout is on in training
    (y1.square().sum() + y2.sum()).backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in attn.parameters())
    attn.eval()
    assert torch.equal(attn(x, None, kpm), attn(x, None, kpm))


# ---- the top-k feed-forward layer ---------------------------------------------------------------------------

def test_topk_ffn_with_k_dff_equals_dense_ffn_and_loads_its_checkpoint():
    torch.manual_seed(0)
    dense = FeedForward(8, 12).double()
    ffn = TopkFeedForward(8, 12, k=12, chunk_size=4).double()
    ffn.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(2, 7, 8, dtype=f64, requires_grad=True)
    y, yd = ffn(x), dense(x)
    torch.testing.assert_close(y, yd, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    a = torch.autograd.grad(y, (x, *ffn.parameters()), g)
    b = torch.autograd.grad(yd, (x, *dense.parameters()), g)
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)


@pytest.mark.parametrize("N,k,chunk", [(1, 3, 4), (13, 3, 4), (8, 1, 8), (9, 20, 2)])
def test_topk_ffn_matches_dense_definition(N, k, chunk):
    torch.manual_seed(N)
    ffn = TopkFeedForward(6, 10, k=k, chunk_size=chunk).double()
    x = torch.randn(1, N, 6, dtype=f64, requires_grad=True)
    y = ffn(x)
    ref = topk_ffn_dense(x, ffn.fc1.weight, ffn.fc1.bias, ffn.fc2.weight, ffn.fc2.bias, k)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    params = (x, *ffn.parameters())
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if k < 10:
        assert not torch.allclose(y, FeedForward.forward(ffn, x))  # really sparse (same fc1/fc2 names)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_topk_ffn_gradcheck(p):
    g = torch.Generator().manual_seed(3)
    x, w1, b1, w2, b2 = (torch.randn(*s, generator=g, dtype=f64, requires_grad=True)
                         for s in [(5, 3), (7, 3), (7,), (3, 7), (3,)])

    def f(*args):
        torch.manual_seed(0)  # the same dropout mask on every evaluation
        return TopkFFNFunction.apply(*args, 3, 2, p, True)
    assert torch.autograd.gradcheck(f, (x, w1, b1, w2, b2))


def test_topk_ffn_saves_no_hidden_matrix_and_dropout_works():
    N, d_ff, k = 64, 48, 4
    ffn = TopkFeedForward(8, d_ff, k=k, chunk_size=16, dropout=0.5)
    x = torch.randn(1, N, 8, requires_grad=True)
    sizes = saved_numels(lambda: ffn(x))
    assert max(sizes) <= max(x.numel(), 8 * d_ff, N * k)
    assert not torch.allclose(ffn(x), ffn(x))           # dropout on in training
    ffn(x).sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in ffn.parameters())
    ffn.eval()
    assert torch.equal(ffn(x), ffn(x))
    with pytest.raises(ValueError, match="positive int"):
        TopkFeedForward(8, 16, k=0)
