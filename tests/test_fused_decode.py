"""The fused decode step (attnlab.decoding.fused) and its kernels (ln_linear, MemSizer's decode step) against the
references and the model's own step; Triton's interpreter on the CPU, the same tests on a GPU where there is one."""
import pytest
import torch

from attnlab.decoding import CUDAGraphs, Fused, greedy, unfusable
from attnlab.kernels.ln_linear import ln_linear, ln_linear_ref
from attnlab.kernels.memsizer.decode import memsizer_decode_
from attnlab.kernels.memsizer.reference import memsizer_decode_ref
from attnlab.transformer import TransformerDecoder

DEV = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = {"linear": {"name": "linear"}, "memsizer": {"name": "memsizer", "decoder": {"k": 8}}}


def f64(t):
    return tuple(f64(x) for x in t) if isinstance(t, tuple) else t.double() if torch.is_tensor(t) else t


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("M,K,N", [(1, 64, 33), (3, 200, 100), (70, 1024, 256)])
@pytest.mark.parametrize("opts", [{}, {"ln": True}, {"ln": True, "act": "relu"}, {"residual": True},
                                  {"bias": False, "act": "relu", "residual": True}])
def test_ln_linear_equals_the_float64_reference(M, K, N, opts):
    torch.manual_seed(M + K)
    x, W = torch.randn(M, K, device=DEV) * 3 + 1, torch.randn(N, K, device=DEV) / K ** 0.5
    b = torch.randn(N, device=DEV)
    kw = dict(ln=(torch.randn(K, device=DEV), torch.randn(K, device=DEV), 1e-5) if opts.get("ln") else None,
              act=opts.get("act"), residual=torch.randn(M, N, device=DEV) if opts.get("residual") else None)
    b = b if opts.get("bias", True) else None
    y = ln_linear(x, W, b, backend="triton", **kw)
    ref = ln_linear_ref(*f64((x, W, b)), **{k: f64(v) for k, v in kw.items()})
    assert y.dtype == torch.float32 and y.shape == (M, N) and rel(y, ref) < 1e-5
    assert torch.equal(ln_linear(x, W, b, backend="triton", static_weight=True, **kw), y)  # weights loaded first
    with torch.autocast(DEV, torch.bfloat16):  # the matmul in bf16, rounded; norm and residual sum in float32
        y = ln_linear(x, W, b, backend="triton", **kw)
        ref = ln_linear_ref(x, W, b, dtype=torch.bfloat16, **kw)
    assert y.dtype == ref.dtype == (torch.float32 if kw["residual"] is not None else torch.bfloat16)
    # the interpreter truncates float32 -> bf16 where the GPU rounds: ~2x the bf16 rounding error
    assert rel(y, ref) < 2e-2


def test_embed_step_equals_the_reference():
    from attnlab.kernels.embed import embed_step, embed_step_ref
    toks = torch.randint(0, 37, (5, 3), device=DEV)[:, 1]  # a strided column, as a search hands them over
    table, positions = torch.randn(37, 48, device=DEV), torch.randn(64, 48, device=DEV)
    for pos in (7, torch.tensor(63, device=DEV)):  # an int, or a device tensor (read inside a CUDA graph)
        a = embed_step(toks, table, 48 ** 0.5, positions, pos, backend="triton")
        assert torch.allclose(a, embed_step_ref(toks, table, 48 ** 0.5, positions, pos), rtol=1e-6, atol=1e-6)


def test_ln_linear_rejects_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        ln_linear(torch.randn(2, 8), torch.randn(4, 9), backend="triton")
    with pytest.raises(ValueError, match="activation"):
        ln_linear(torch.randn(2, 8), torch.randn(4, 8), act="gelu", backend="triton")


@pytest.mark.parametrize("B,H,k,d", [(3, 8, 32, 256), (2, 3, 5, 40), (2, 2, 64, 300)])  # the last: 2 S tiles
def test_memsizer_decode_step_equals_the_float64_reference(B, H, k, d):
    torch.manual_seed(d)
    proj, S = torch.randn(B, H * k + k + d, device=DEV), torch.randn(B, k, d, device=DEV)
    x = torch.randn(B, d, device=DEV)
    count = torch.arange(B, device=DEV, dtype=torch.float32) * 3  # row 0: an empty memory
    ln_l = (torch.randn(k, device=DEV), torch.randn(k, device=DEV), 1e-5)
    ln_r = (torch.randn(d, device=DEV), torch.randn(d, device=DEV), 1e-5)
    y0, S0, c0 = memsizer_decode_ref(*f64((proj, H, ln_l, ln_r, S, count, x)))
    y = memsizer_decode_(proj, H, ln_l, ln_r, S, count, x)  # S, count in place
    assert rel(y, y0) < 1e-5 and rel(S, S0) < 1e-5 and torch.equal(count.double(), c0)
    with pytest.raises(ValueError, match="do not fit"):
        memsizer_decode_(proj[:, 1:], H, ln_l, ln_r, S, count, x)


def decoder(variant, d_model=32, n_heads=4, **kw):
    torch.manual_seed(0)
    return TransformerDecoder(VARIANTS[variant], vocab_size=37, max_len=64, d_model=d_model, n_layers=2,
                              n_heads=n_heads, d_ff=64, dropout=0.0, **kw).to(DEV).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_steps_equal_the_models_steps(variant):
    net = decoder(variant)
    fused = Fused(net, backend="triton")
    prefix, toks = torch.randint(0, 37, (3, 5), device=DEV), torch.randint(0, 37, (3, 4), device=DEV)
    for amp, tol in ((False, 1e-5), (True, 2e-2)):
        with torch.no_grad(), torch.autocast(DEV, torch.bfloat16, enabled=amp):
            s1, s2 = net.init_state(3), fused.init_state(3)
            net.prefill(prefix, s1), fused.prefill(prefix, s2)
            for t in range(toks.shape[1]):
                a, b = net.step(toks[:, t], s1), fused.step(toks[:, t], s2)
                assert a.dtype == b.dtype and a.shape == b.shape and rel(b, a) < tol
        assert s1["pos"] == s2["pos"] == 9
        for x, y in zip(s1["layers"], s2["layers"]):  # the states advanced alike (in place for the fused step)
            assert all(rel(y[0][k], x[0][k]) < tol for k in x[0] if torch.is_tensor(x[0][k]))
    assert torch.equal(greedy(fused, prefix, 6), greedy(net, prefix, 6))


@torch.no_grad()
def test_fused_weights_follow_the_parameters():
    """An in-place update (an optimizer step between searches) refreshes the copies in place; a replaced
    parameter object makes new ones (and tells a graph that read the old ones to capture again)."""
    net = decoder("linear")
    fused = Fused(net, backend="triton")
    tok = torch.randint(0, 37, (2,), device=DEV)
    fused.step(tok, fused.init_state(2))
    first = fused.weights[0]["in"][0]
    net.stack.layers[0].self_attn.k_proj.weight.mul_(2.0)
    net.stack.layers[1].ffn.fc2.bias.add_(1.0)
    assert fused.sync_weights() and fused.weights[0]["in"][0] is first
    assert rel(fused.step(tok, fused.init_state(2)), net.step(tok, net.init_state(2))) < 1e-5
    net.stack.layers[1].ffn.fc1.weight = torch.nn.Parameter(net.stack.layers[1].ffn.fc1.weight * 0.5)
    assert not fused.sync_weights() and fused.weights[0]["in"][0] is not first
    assert rel(fused.step(tok, fused.init_state(2)), net.step(tok, net.init_state(2))) < 1e-5


@torch.no_grad()
def test_what_the_fused_step_does_not_take():
    assert "softmax" in unfusable(TransformerDecoder({"name": "softmax"}, vocab_size=9, max_len=8, d_model=16,
                                                     n_layers=1, n_heads=2))
    assert "performer" in unfusable(TransformerDecoder({"name": "performer"}, vocab_size=9, max_len=8, d_model=16,
                                                       n_layers=1, n_heads=2))
    assert "post-norm" in unfusable(decoder("linear", norm_first=False))
    with pytest.raises(ValueError, match="Fix: decode with the model itself"):
        Fused(decoder("linear", ffn_topk=4))
    assert isinstance(CUDAGraphs(decoder("memsizer")).model, Fused)
    assert not isinstance(CUDAGraphs(decoder("memsizer"), fuse=False).model, Fused)
    # a padding mask or training mode: the model's own step (the same results, exactly)
    net = decoder("linear")
    fused, tok = Fused(net, backend="triton"), torch.randint(0, 37, (2,), device=DEV)
    pad = torch.tensor([False, True], device=DEV)
    assert torch.equal(fused.step(tok, fused.init_state(2), pad), net.step(tok, net.init_state(2), pad))
