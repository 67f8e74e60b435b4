"""MemSizer: the prefix-sum reference vs the explicit T x T formula, the recurrent form, padding, state, config."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from attnlab.kernels.memsizer import memsizer, memsizer_step
from attnlab.kernels.memsizer.reference import memsizer_chunked_torch, memsizer_ref, memsizer_step_ref
from attnlab.attention import ConfigError, build_attention
from attnlab.attention.checks import parallel_vs_recurrent, random_padding

CONF = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf/attention/memsizer.yaml").read_text())
f64 = torch.float64


def naive(p, a, v, causal, key_padding_mask=None):
    """y_t = c_t^{-1/2} sum_j allowed[t, j] (p_t . a_j) v_j with an explicit (T, S) matrix and explicit counts."""
    B, T, _ = p.shape
    S = a.shape[1]
    allowed = torch.ones(B, T, S, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(T, S, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed &= ~key_padding_mask[:, None, :]
    w = (p @ a.transpose(1, 2)) * allowed
    c = allowed.sum(-1).clamp_min(1).to(p.dtype)
    return (w @ v) / c.sqrt()[..., None]


def inputs(B, T, S, k, d, g):
    p = torch.randn(B, T, k, generator=g, dtype=f64).softmax(-1)
    return p, torch.randn(B, S, k, generator=g, dtype=f64), torch.randn(B, S, d, generator=g, dtype=f64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("side", [None, "right", "left"])
def test_reference_matches_explicit_formula(causal, T, side):
    g = torch.Generator().manual_seed(T)
    S = T if causal else 5
    p, a, v = inputs(3, T, S, 4, 6, g)
    mask = None if side is None else random_padding(3, S, g, side)
    out = memsizer_ref(p, a, v, causal, key_padding_mask=mask)
    assert (out - naive(p, a, v, causal, mask)).abs().max() <= 1e-10


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 7, 16, 33, 100])
def test_chunked_matches_reference(causal, T):
    """The CPU path (what memsizer(backend="torch") runs): T = 1, T < chunk, T a multiple of it, ragged tails."""
    g = torch.Generator().manual_seed(T)
    S = T if causal else 6
    p, a, v = inputs(2, T, S, 5, 3, g)
    mask = random_padding(2, S, g, "left")
    ref = memsizer_ref(p, a, v, causal, key_padding_mask=mask)
    assert (memsizer_chunked_torch(p, a, v, causal, mask, chunk=16) - ref).abs().max() <= 1e-10
    assert (memsizer(p, a, v, causal, mask, backend="torch") - ref).abs().max() <= 1e-10
    w = torch.randn(ref.shape, generator=g, dtype=f64)

    def grads(fn):
        xs = [t.clone().requires_grad_() for t in (p, a, v)]
        return torch.autograd.grad((fn(*xs, causal, mask) * w).sum(), xs)

    for g_ref, g_chunk in zip(grads(memsizer_ref), grads(lambda *z: memsizer_chunked_torch(*z, chunk=16))):
        assert (g_ref - g_chunk).abs().max() <= 1e-10


@pytest.mark.parametrize("side", [None, "right", "left"])
def test_step_reference_matches_parallel_reference(side):
    """Every position, padded ones included: a padded step reads the current state, as the parallel form does."""
    g = torch.Generator().manual_seed(1)
    B, T, k, d = 4, 9, 3, 5
    p, a, v = inputs(B, T, T, k, d, g)
    mask = None if side is None else random_padding(B, T, g, side)
    if mask is not None:
        mask[-1] = True  # a row that is all padding reads zeros
    S, count, ys = torch.zeros(B, k, d, dtype=f64), torch.zeros(B, dtype=f64), []
    for t in range(T):
        y, S, count = memsizer_step_ref(p[:, t], a[:, t], v[:, t], S, count, None if mask is None else ~mask[:, t])
        ys.append(y)
    ref = memsizer_ref(p, a, v, True, key_padding_mask=mask)
    assert (torch.stack(ys, 1) - ref).abs().max() <= 1e-10
    n_pad = torch.zeros(B, dtype=torch.long) if mask is None else mask.sum(1)
    assert torch.equal(count, (T - n_pad).to(f64))
    if mask is not None:
        assert ref[-1].abs().max() == 0


@pytest.mark.parametrize("role", ["decoder", "cross"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("T", [1, 9])
def test_parallel_matches_recurrent(role, side, T):
    torch.manual_seed(T)
    attn = build_attention(CONF, role, d_model=24, n_heads=3)
    assert parallel_vs_recurrent(attn, T=T, side=side, seed=T) <= 1e-10


def test_module_matches_the_equations():
    """Rebuild y from the module's parameters by the paper's equations (per-head softmax, head mean, LayerNorms,
    t^{-1/2} scaling) through the explicit T x T formula."""
    torch.manual_seed(0)
    H, D, k = 3, 12, 5
    attn = build_attention({"name": "memsizer", "k": k}, "decoder", D, H).double().eval()
    x = torch.randn(2, 6, D, dtype=f64)
    logits = x @ attn.phi.weight.T + attn.phi.bias
    p = torch.stack([logits[..., h * k:(h + 1) * k].softmax(-1) for h in range(H)]).mean(0)
    a = F.layer_norm(x @ attn.w_l.weight.T + attn.w_l.bias, (k,), attn.ln_l.weight, attn.ln_l.bias)
    v = F.layer_norm(x @ attn.w_r.weight.T + attn.w_r.bias, (D,), attn.ln_r.weight, attn.ln_r.bias)
    assert (attn(x) - naive(p, a, v, True)).abs().max() <= 1e-12


@pytest.mark.parametrize("role", ["encoder", "decoder", "cross"])
def test_padded_keys_contribute_nothing_and_are_not_counted(role):
    """Padding n keys must give exactly the output of the sequence without them: the padded keys' inputs are
    irrelevant and the length scaling counts only real keys. Decoder: left padding (right padding is hidden by
    causality); encoder / cross: right padding."""
    torch.manual_seed(2)
    D, n = 16, 3
    attn = build_attention(CONF, role, D, 2).double().eval()
    x = torch.randn(2, 7, D, dtype=f64)
    keys = torch.randn(2, 8, D, dtype=f64) if role == "cross" else x
    S = keys.shape[1]
    mask = torch.zeros(2, S, dtype=torch.bool)
    pads = slice(0, n) if role == "decoder" else slice(S - n, S)
    real = slice(n, S) if role == "decoder" else slice(0, S - n)
    mask[:, pads] = True
    noisy = keys.clone()
    noisy[:, pads] = 100 * torch.randn(2, n, D, dtype=f64)
    if role == "cross":
        y, y_noisy, y_short = attn(x, keys, mask), attn(x, noisy, mask), attn(x, keys[:, real])
    else:
        y, y_noisy, y_short = attn(x, None, mask)[:, real], attn(noisy, None, mask)[:, real], attn(x[:, real])
    assert (y - y_noisy).abs().max() <= 1e-12
    assert (y - y_short).abs().max() <= 1e-12


@pytest.mark.parametrize("role", ["encoder", "decoder", "cross"])
def test_gradients_are_finite(role):
    torch.manual_seed(3)
    attn = build_attention({**CONF, "dropout": 0.1}, role, 16, 4).train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    mem = torch.randn(3, 6, 16, requires_grad=True) if role == "cross" else None
    mask = torch.zeros(3, 5 if mem is None else 6, dtype=torch.bool)
    mask[1, -2:] = True
    mask[2] = True  # all padding: the count is clamped to 1 and the row reads zeros
    attn(x, mem, mask).square().sum().backward()
    grads = [x.grad] + ([mem.grad] if mem is not None else []) + [q.grad for q in attn.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert attn.phi.weight.grad.abs().sum() > 0 and attn.w_l.weight.grad.abs().sum() > 0


def test_state_is_constant_in_length():
    attn = build_attention(CONF, "decoder", 16, 2).eval()
    state, sizes = attn.init_state(2), set()
    for _ in range(20):
        _, state = attn.step(torch.randn(2, 1, 16), state)
        sizes.add(tuple((name, t.shape) for name, t in state.items()))
    assert sizes == {(("S", (2, 4, 16)), ("count", (2,)))}  # k = 4 slots for the decoder role
    assert state["count"].dtype == torch.float32
    cross = build_attention(CONF, "cross", 16, 2).eval()
    st = cross.init_state(2, torch.randn(2, 11, 16))
    assert st["M"].shape == (2, 32, 16)


def test_reorder_continues_the_selected_sequences():
    """After reorder(idx), stepping on must equal decoding the sequences x[idx] from scratch."""
    torch.manual_seed(4)
    attn = build_attention(CONF, "decoder", 16, 2).double().eval()
    cross = build_attention(CONF, "cross", 16, 2).double().eval()
    x, mem = torch.randn(3, 5, 16, dtype=f64), torch.randn(3, 4, 16, dtype=f64)
    mmask = torch.tensor([[False] * 4, [False, False, True, True], [False, True, True, True]])
    idx = torch.tensor([2, 2, 0])

    def run(x, state, cstate, ts):
        for t in ts:
            y, state = attn.step(x[:, t:t + 1], state)
            yc, cstate = cross.step(x[:, t:t + 1], cstate)
        return y, yc, state, cstate

    _, _, s, cs = run(x, attn.init_state(3), cross.init_state(3, mem, mmask), range(3))
    y, yc, _, _ = run(x[idx], s.reorder(idx), cs.reorder(idx), range(3, 5))
    y_ref, yc_ref, _, _ = run(x[idx], attn.init_state(3), cross.init_state(3, mem[idx], mmask[idx]), range(5))
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12) and torch.allclose(yc, yc_ref, rtol=0, atol=1e-12)


def test_config_roles_and_lm_override():
    dec, cross, enc = (build_attention(CONF, r, 16, 2) for r in ("decoder", "cross", "encoder"))
    assert (dec.k, cross.k, enc.k) == (4, 32, 32)
    assert dec.w_l.out_features == 4 and dec.phi.out_features == 2 * 4
    lm = build_attention({**CONF, "decoder": {"k": 32, "init_scale_keys": 32, "init_scale_values": 1}}, "decoder",
                         16, 2)
    assert lm.k == 32 and lm.init_scale_keys == 32 and lm.init_scale_values == 1


def test_init_is_scaled_xavier_with_zero_bias():
    attn = build_attention({"name": "memsizer", "init_scale_keys": 32.0, "init_scale_values": 1.0}, "encoder",
                           64, 4)
    for lin, scale in ((attn.phi, 32.0), (attn.w_l, 1.0), (attn.w_r, 1.0)):
        fan_out, fan_in = lin.weight.shape
        bound = scale ** -0.5 * (6 / (fan_in + fan_out)) ** 0.5
        assert 0.9 * bound < lin.weight.abs().max() <= bound
        assert lin.bias.abs().max() == 0


def test_errors_name_the_problem(monkeypatch):
    attn = build_attention(CONF, "cross", 16, 2)
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with pytest.raises(ValueError, match="memory"):
        attn(x)
    with pytest.raises(ValueError, match=r"\(batch, time, 16\)"):
        attn(torch.randn(2, 5, 12), mem)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(x, mem, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs `memory`"):
        attn.init_state(2)
    dec = build_attention(CONF, "decoder", 16, 2)
    with pytest.raises(ValueError, match="one token"):
        dec.step(torch.randn(2, 3, 16), dec.init_state(2))
    with pytest.raises(ValueError, match="no incremental form"):
        build_attention(CONF, "encoder", 16, 2).init_state(2)
    with pytest.raises(ValueError, match="T == S"):
        memsizer_ref(torch.rand(1, 4, 3), torch.rand(1, 5, 3), torch.rand(1, 5, 2), causal=True)
    with pytest.raises(ValueError, match=r"p \(B, T, k\)"):
        memsizer_ref(torch.rand(1, 4, 3), torch.rand(1, 4, 2), torch.rand(1, 4, 2), causal=False)
    with pytest.raises(ValueError, match="memsizer_step"):
        memsizer_step(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 4), torch.zeros(2, 3, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="backend"):
        memsizer(torch.rand(1, 4, 3), torch.rand(1, 4, 3), torch.rand(1, 4, 2), True, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        memsizer(torch.rand(1, 4, 3), torch.rand(1, 4, 3), torch.rand(1, 4, 2), True, backend="triton")
    with pytest.raises(ConfigError, match="k"):
        build_attention({"name": "memsizer", "k": 0}, "decoder", 16, 2)
    with pytest.raises(ConfigError, match="no option"):
        build_attention({"name": "memsizer", "slots": 4}, "decoder", 16, 2)
