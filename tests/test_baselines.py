"""Reformer, Performer, Linformer: each form against its own reference math, masks, roles, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.kernels.linear_attn import linear_attention
from attnlab.attention import ConfigError, build_attention
from attnlab.attention.checks import parallel_vs_recurrent, random_padding
from attnlab.attention.performer import favor_features, orthogonal_features
from attnlab.attention.reformer import SELF_PENALTY, lsh_attention, lsh_attention_reference, lsh_buckets

D, H = 16, 2


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def lsh_inputs(B, T, d, R, n_buckets, seed, dv=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, T, dv, generator=g, dtype=torch.float64)
    kn = F.normalize(q, dim=-1)
    buckets = lsh_buckets(kn, torch.randn(H, R, d, n_buckets // 2, generator=g, dtype=torch.float64))
    return q, kn, v, buckets, random_padding(B, T, g)


# ---------------------------------------------------------------------------------------------------- Reformer
def windowed_reference(q, kn, v, buckets, n_buckets, causal, pad, C):
    """Dense restatement of chunked LSH attention: per round, query i sees key j iff they share the bucket and j's
    chunk in the (bucket, position) order (padding last) is i's chunk or the one before; rounds combined by
    logsumexp, logits lowered by log(#rounds sharing a bucket)."""
    B, _, R, T = buckets.shape
    pos = torch.arange(T)
    eye = torch.eye(T, dtype=torch.bool)
    sort_b = buckets.masked_fill(pad[:, None, None, :], n_buckets)
    # rank of j = number of positions before it in (bucket, position) order
    before = (sort_b[..., None, :] < sort_b[..., :, None]) | \
             ((sort_b[..., None, :] == sort_b[..., :, None]) & (pos[None, :] < pos[:, None]))
    chunk = before.sum(-1) // C  # (B, H, R, T)
    window = (chunk[..., None, :] == chunk[..., :, None]) | (chunk[..., None, :] == chunk[..., :, None] - 1)
    same = buckets[..., :, None] == buckets[..., None, :]  # (B, H, R, T, T)
    allowed = same & window & (~pad[:, None, None, None, :] | eye)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    s = (q @ kn.transpose(-1, -2)).unsqueeze(2) * q.shape[-1] ** -0.5 - SELF_PENALTY * eye
    s = s - same.sum(2, keepdim=True).clamp_min(1).to(s.dtype).log()
    s = s.masked_fill(~allowed, float("-inf"))
    lse = s.logsumexp(-1)  # (B, H, R, T)
    out = s.softmax(-1) @ v.unsqueeze(2)
    return (lse.softmax(2).unsqueeze(-1) * out).sum(2)


@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 13])
def test_reformer_one_chunk_is_softmax_over_shared_buckets(R, causal, T):
    q, kn, v, b, pad = lsh_inputs(3, T, 8, R, 4, seed=T + R)
    out = lsh_attention(q, kn, v, b, 4, causal, pad, chunk_size=16)
    assert rel(out, lsh_attention_reference(q, kn, v, b, causal, pad)) <= 1e-12


@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("C", [3, 4])
def test_reformer_chunks_match_dense_windowed_reference(R, causal, C):
    T = 13  # not a multiple of C
    q, kn, v, b, pad = lsh_inputs(3, T, 8, R, 4, seed=C + R)
    out = lsh_attention(q, kn, v, b, 4, causal, pad, chunk_size=C)
    assert rel(out, windowed_reference(q, kn, v, b, 4, causal, pad, C)) <= 1e-12
    assert rel(out, lsh_attention_reference(q, kn, v, b, causal, pad)) > 1e-3  # windows did cut buckets here


def test_reformer_attends_to_itself_only_when_alone():
    T = 5
    q, kn, v, _, _ = lsh_inputs(1, T, 8, 1, 2, seed=0)
    b = torch.zeros(1, H, 1, T, dtype=torch.long)  # everybody in one bucket
    out = lsh_attention(q, kn, v, b, 2, True, None, chunk_size=8)
    assert torch.allclose(out[:, :, 0], v[:, :, 0], rtol=0, atol=1e-12)  # the first token has only itself
    s = (q @ kn.transpose(-1, -2)) * 8 ** -0.5
    for i in range(1, T):
        expect = (s[:, :, i:i + 1, :i].softmax(-1) @ v[:, :, :i])[:, :, 0]  # earlier tokens, never itself
        assert torch.allclose(out[:, :, i], expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_hashes", [1, 4])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("T", [1, 9])
def test_reformer_parallel_matches_recurrent_when_chunk_holds_sequence(n_hashes, side, T):
    torch.manual_seed(T)
    attn = build_attention({"name": "reformer", "n_hashes": n_hashes, "n_buckets": 4, "chunk_size": 16},
                           "decoder", D, H)
    assert parallel_vs_recurrent(attn, T=T, side=side, seed=T) <= 1e-10


def test_reformer_recurrent_is_the_bucket_reference_whatever_the_chunk():
    """Decoding ignores chunk boundaries: it attends to every cached key sharing a bucket in some round."""
    torch.manual_seed(0)
    attn = build_attention({"name": "reformer", "n_hashes": 2, "n_buckets": 4, "chunk_size": 2}, "decoder", D, H)
    attn = attn.double().eval()
    B, T = 2, 11
    x = torch.randn(B, T, D, dtype=torch.float64)
    pad = random_padding(B, T, torch.Generator().manual_seed(1))
    state, steps = attn.init_state(B), []
    for t in range(T):
        y, state = attn.step(x[:, t:t + 1], state, pad=pad[:, t])
        steps.append(y)
    q, v = attn.split_heads(attn.qk_proj(x)), attn.split_heads(attn.v_proj(x))
    kn = F.normalize(q, dim=-1)
    ref = attn.out_proj(attn.merge_heads(lsh_attention_reference(q, kn, v, attn.hash(kn), True, pad)))
    assert rel(torch.cat(steps, 1)[~pad], ref[~pad]) <= 1e-12
    assert rel(attn(x, None, pad)[~pad], ref[~pad]) > 1e-3  # while the chunked parallel form differs here


@pytest.mark.parametrize("role", ["encoder", "decoder"])
def test_reformer_padding_is_ignored_with_small_chunks(role):
    torch.manual_seed(0)
    attn = build_attention({"name": "reformer", "n_hashes": 2, "n_buckets": 4, "chunk_size": 3}, role, D, H)
    attn = attn.double().eval()
    x = torch.randn(2, 10, D, dtype=torch.float64)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 7:], mask[1, :2] = True, True  # right and left padding
    x2 = x.clone()
    x2[mask] = torch.randn(int(mask.sum()), D, dtype=torch.float64) * 10
    torch.testing.assert_close(attn(x, None, mask)[~mask], attn(x2, None, mask)[~mask], rtol=0, atol=1e-12)


def test_reformer_hashing_redraws_in_training_only():
    torch.manual_seed(0)
    attn = build_attention({"name": "reformer", "n_buckets": 8, "chunk_size": 4}, "encoder", D, H)
    x = torch.randn(2, 24, D)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.equal(attn(x), attn(x))


# --------------------------------------------------------------------------------------------------- Performer
@pytest.mark.parametrize("role", ["decoder", "cross"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("T", [1, 9])
def test_performer_parallel_matches_recurrent(role, side, T):
    torch.manual_seed(T)
    attn = build_attention({"name": "performer", "nb_features": 24}, role, D, H)
    assert parallel_vs_recurrent(attn, T=T, side=side, seed=T) <= 1e-10


def test_orthogonal_features_blocks_are_orthogonal():
    torch.manual_seed(0)
    w = orthogonal_features(20, 8)  # blocks of 8, 8, 4 rows
    for block in (w[:8], w[8:16], w[16:]):
        gram = block @ block.T
        assert torch.allclose(gram - torch.diag(gram.diag()), torch.zeros_like(gram), atol=1e-4)


def test_favor_kernel_is_unbiased_estimate_of_exp():
    """phi(q).phi(k) estimates exp(q.k / sqrt(d)): with 16k features the median relative error is ~0.04, while
    dropping the -|x|^2/2 term or scaling by d^-1/2 instead of d^-1/4 gives > 0.1."""
    d, m = 16, 16384
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(64, d, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    torch.manual_seed(0)
    w = orthogonal_features(m, d, dtype=torch.float64)
    est = favor_features(q, w, False) @ favor_features(k, w, False).T
    exact = torch.exp(q @ k.T / math.sqrt(d))
    assert ((est - exact).abs() / exact).median() < 0.08


@pytest.mark.parametrize("causal", [False, True])
def test_favor_attention_approximates_softmax(causal):
    """Relative error of the whole attention with 4096 features: ~0.05 (seeds 0-5: 0.03-0.06); missing the
    |x|^2/2 term, the wrong scale or a per-key stabilizer give 0.10-0.55."""
    d, T, m = 16, 32, 4096
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, T, d, generator=g, dtype=torch.float64) * s for s in (0.5, 0.5, 1.0))
    torch.manual_seed(0)
    w = orthogonal_features(m, d, dtype=torch.float64)
    y = linear_attention(favor_features(q, w, True), favor_features(k, w, False), v, causal=causal,
                         feature_map=None, backend="torch")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert rel(y, ref) < 0.08


def test_performer_redraws_every_n_training_calls_and_never_in_eval():
    torch.manual_seed(0)
    attn = build_attention({"name": "performer", "nb_features": 8, "redraw": 3}, "encoder", D, H)
    x = torch.randn(1, 4, D)
    attn.eval()
    w0 = attn.features_w.clone()
    for _ in range(5):
        attn(x)
    assert torch.equal(attn.features_w, w0)
    attn.train()
    seen = []
    for _ in range(7):
        attn(x)
        seen.append(attn.features_w.clone())
    changed = [not torch.equal(a, b) for a, b in zip([w0] + seen[:-1], seen)]
    assert changed == [False, False, False, True, False, False, True]
    # the counter travels with the checkpoint, so a resumed run redraws on the same step
    clone = build_attention({"name": "performer", "nb_features": 8, "redraw": 3}, "encoder", D, H)
    clone.load_state_dict(attn.state_dict())
    assert clone.calls == attn.calls == 1 and torch.equal(clone.features_w, attn.features_w)


# --------------------------------------------------------------------------------------------------- Linformer
def test_linformer_rejects_causal_use_and_missing_or_short_max_len():
    with pytest.raises(ConfigError, match=r"linformer.*'decoder' \(causal self-attention\)\. Fix"):
        build_attention({"name": "linformer", "max_len": 8}, "decoder", D, H)
    with pytest.raises(ConfigError, match="needs `max_len`"):
        build_attention({"name": "linformer"}, "encoder", D, H)
    attn = build_attention({"name": "linformer", "max_len": 8, "k": 4}, "cross", D, H)
    with pytest.raises(ValueError, match="longer than max_len=8"):
        attn(torch.randn(1, 3, D), torch.randn(1, 9, D))
    with pytest.raises(ValueError, match="longer than max_len=8"):
        attn.init_state(1, torch.randn(1, 9, D))


@pytest.mark.parametrize("T", [1, 9])
def test_linformer_cross_parallel_matches_recurrent(T):
    torch.manual_seed(T)
    attn = build_attention({"name": "linformer", "max_len": 12, "k": 5}, "cross", D, H)
    assert parallel_vs_recurrent(attn, T=T, S=7, seed=T) <= 1e-10


def test_linformer_with_identity_projection_is_softmax_attention():
    """E = F = I (k = S = max_len): projecting along length is a no-op and Linformer is softmax attention."""
    torch.manual_seed(0)
    S = 6
    lin = build_attention({"name": "linformer", "max_len": S, "k": S}, "cross", D, H).double()
    soft = build_attention({"name": "softmax"}, "cross", D, H).double()
    soft.load_state_dict({k: v for k, v in lin.state_dict().items() if not k.startswith("proj_")})
    with torch.no_grad():
        lin.proj_k.copy_(torch.eye(S))
        lin.proj_v.copy_(torch.eye(S))
    x, mem = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, S, D, dtype=torch.float64)
    assert rel(lin(x, mem), soft(x, mem)) <= 1e-12


@pytest.mark.parametrize("role", ["encoder", "cross"])
def test_linformer_padding_is_ignored(role):
    torch.manual_seed(0)
    attn = build_attention({"name": "linformer", "max_len": 10, "k": 4, "share_kv": True}, role, D, H).double()
    x, mem = torch.randn(2, 7, D, dtype=torch.float64), torch.randn(2, 7, D, dtype=torch.float64)
    mask = random_padding(2, 7, torch.Generator().manual_seed(3))
    mask[1, -3:] = True
    keys = x if role == "encoder" else mem
    keys2 = keys.clone()
    keys2[mask] = torch.randn(int(mask.sum()), D, dtype=torch.float64) * 10
    run = (lambda k: attn(k, None, mask)) if role == "encoder" else (lambda k: attn(x, k, mask))
    keep = ~mask if role == "encoder" else torch.ones_like(mask)
    torch.testing.assert_close(run(keys)[keep], run(keys2)[keep], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ all variants
CASES = [("reformer", {"n_hashes": 2, "n_buckets": 4, "chunk_size": 4}, ("encoder", "decoder")),
         ("performer", {"nb_features": 8}, ("encoder", "decoder", "cross")),
         ("linformer", {"max_len": 12, "k": 4}, ("encoder", "cross"))]


@pytest.mark.parametrize("name,opts,roles", CASES)
def test_finite_gradients_for_every_supported_role(name, opts, roles):
    torch.manual_seed(0)
    for role in roles:
        attn = build_attention({"name": name, **opts}, role, D, H).train()
        x, mem = torch.randn(3, 10, D), torch.randn(3, 12, D)
        mask = random_padding(3, 12 if role == "cross" else 10, torch.Generator().manual_seed(0))
        y = attn(x, mem if role == "cross" else None, mask)
        keep = torch.ones(3, 10, dtype=torch.bool) if role == "cross" else ~mask
        y[keep].square().sum().backward()
        grads = [p.grad for p in attn.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), (name, role)
        assert all(g.abs().sum() > 0 for g in grads), (name, role)


@pytest.mark.parametrize("name,opts,roles", CASES)
def test_unsupported_roles_are_config_errors(name, opts, roles):
    for role in {"encoder", "decoder", "cross"} - set(roles):
        with pytest.raises(ConfigError, match=f"{name}.*supports the roles.*Fix"):
            build_attention({"name": name, **opts}, role, D, H)
    if name == "reformer":
        with pytest.raises(ConfigError, match="n_buckets=5 must be even"):
            build_attention({"name": name, "n_buckets": 5}, "decoder", D, H)


@pytest.mark.parametrize("name,opts,roles", CASES)
def test_encoder_has_no_incremental_form(name, opts, roles):
    attn = build_attention({"name": name, **opts}, "encoder", D, H)
    with pytest.raises(ValueError, match="no incremental form"):
        attn.init_state(2)
