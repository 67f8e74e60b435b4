"""Linear-attention Triton kernels against the float64 reference, run on the CPU by Triton's interpreter
(switched on in conftest.py)."""
import re

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("numpy")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import attnlab.kernels.linear_attn.chunk as chunk  # noqa: E402
import attnlab.kernels.linear_attn.function as function  # noqa: E402
import attnlab.kernels.linear_attn.recurrent as recurrent  # noqa: E402
from kernel_utils import TOL, as_on_gpu, compile_for_sm90, record_launches, rel, run_id, serial_mode  # noqa: E402
from attnlab.kernels.linear_attn.reference import exclusive_scan_ref, linear_attention_ref, \
    linear_attention_step_ref  # noqa: E402


def padding(B, S, g):
    m = torch.rand(B, S, generator=g) < 0.3
    m[0] = False
    m[-1, 0] = True  # a row whose first keys are padding: den = 0 there, r = 1/eps
    return m


# (causal, B, H, T, S, d, dv, dtype, mask, causal runs per sequence (CONFIG["programs"]) or "serial" / "serial32":
# one run per chunk, the states from the serial pass (_prefix_kernel), its state tiles at most 64 / 32 wide)
CASES = [
    (True, 2, 2, 63, 63, 8, 24, torch.float32, True, 0),
    (True, 1, 2, 129, 129, 16, 40, torch.bfloat16, True, 0),
    (True, 2, 1, 129, 129, 8, 16, torch.float32, True, 64),     # split into one-chunk runs: prefix / suffix states
    (True, 1, 2, 257, 257, 8, 16, torch.float32, True, 6),      # runs of 2, 2 and 1 chunks: states carried too
    (True, 2, 1, 65, 65, 64, 80, torch.float32, True, 0),       # two dv-tiles: dq/dk partials, dden outside
    (True, 2, 1, 1, 1, 4, 4, torch.float16, False, 0),
    (True, 1, 2, 129, 129, 16, 40, torch.bfloat16, True, "serial"),  # bf16 states; dden in the serial pass
    (True, 2, 1, 200, 200, 64, 80, torch.float32, True, "serial32"),  # 2 x 3 state tiles; dden outside
    (True, 1, 2, 192, 192, 64, 64, torch.bfloat16, True, "serial32"),  # 2 x 2 bf16 state tiles, one dv-tile
    (True, 2, 1, 130, 130, 8, 16, torch.float16, False, "serial"),
    (False, 2, 2, 63, 129, 8, 24, torch.bfloat16, True, 0),
    (False, 1, 1, 1, 63, 16, 16, torch.float32, False, 0),
    (False, 2, 1, 40, 70, 64, 80, torch.float16, True, 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'causal' if c[0] else 'bidir'}-T{c[3]}-S{c[4]}-d{c[5]}-"
                         f"dv{c[6]}-{str(c[7])[6:]}{'-mask' if c[8] else ''}{run_id(c[9])}")
def test_linear_attention_matches_reference(case, poison, monkeypatch):
    causal, B, H, T, S, d, dv, dt, use_mask, programs = case
    serial, programs, passes = serial_mode(monkeypatch, programs)
    monkeypatch.setitem(chunk.CONFIG, "programs", programs)
    monkeypatch.setitem(chunk.CONFIG, "run_min_chunks", 0 if programs else 10 ** 9)  # runs only when asked
    monkeypatch.setitem(chunk.CONFIG, "one_chunk_runs", 0)  # as many as "programs" asks (tested below)
    g = torch.Generator().manual_seed(T * 31 + d)
    q, k = torch.randn(B, H, T, d, generator=g), torch.randn(B, H, S, d, generator=g)
    v, dy = torch.randn(B, H, S, dv, generator=g), torch.randn(B, H, T, dv, generator=g)
    mask = padding(B, S, g) if use_mask else None
    xs = [x.to(dt).requires_grad_() for x in (q, k, v)]
    y = function.linear_attention_triton(*xs, causal=causal, key_padding_mask=mask)
    grads = torch.autograd.grad(y, xs, dy.to(dt))
    x64 = [x.detach().double().requires_grad_() for x in xs]
    y64 = linear_attention_ref(*x64, causal=causal, key_padding_mask=mask)
    g64 = torch.autograd.grad(y64, x64, dy.to(dt).double())
    assert y.dtype == dt and y.shape == (B, H, T, dv)
    assert rel(y, y64) < TOL[dt], rel(y, y64)
    names = ("dq", "dk", "dv") if not (causal and T == 1) else ("dv",)  # T=1 causal: dq, dk ~ eps, pure rounding
    assert passes == ([False, True] if serial else []), passes  # forward and backward passes, only when asked
    for name, a, b in zip(("dq", "dk", "dv"), grads, g64):
        if name in names:
            assert torch.isfinite(a).all(), name
            assert rel(a, b) < TOL[dt], (name, rel(a, b))


def test_run_split_rules():
    """How a causal sequence is cut (chunk._splits, B, H, dv-tiles, rows): short ones with enough programs are not;
    split ones of up to one_chunk_runs chunks get one run per chunk; longer ones about `programs` programs."""
    cfg = chunk.CONFIG
    assert chunk._splits(8, 16, 1, 31 * 64, True, 64) == 1  # fewer than run_min_chunks, 128 programs: serial
    assert chunk._splits(8, 16, 1, 64 * 64, True, 64) == 64  # split: one run per chunk
    assert chunk._splits(4, 8, 1, 4096, True, 64) == 64  # too few programs (fill): split, one run per chunk
    assert chunk._splits(8, 16, 1, 256 * 64, True, 64) == triton.cdiv(cfg["programs"], 128)  # long: ~programs
    assert chunk._splits(8, 16, 1, 256 * 64, False, 64) == triton.cdiv(4 * 132, 128)  # bidirectional: partial sums
    assert not chunk._carry(True, 64, 64 * 64, 64) and chunk._carry(True, 17, 256 * 64, 64)
    assert chunk._carry(False, 64, 64 * 64, 64)
    # the serial state pass: enough (b, h, state tile) programs, narrowing the tiles to get there; else runs + scan
    smem = 232448
    assert chunk._serial_tiles(8, 16, 64, 64, 1024, 64, 2, smem) == (64, 64)  # 128 programs
    assert chunk._serial_tiles(4, 8, 64, 64, 4096, 64, 2, smem) == (32, 32)  # 32 heads x 4 tiles
    assert chunk._serial_tiles(1, 8, 64, 64, 16384, 64, 2, smem) is None  # 32 programs at most: runs + scan
    assert chunk._serial_tiles(8, 16, 64, 64, 64, 64, 2, smem) is None  # one chunk: nothing to pass on
    assert chunk._serial_tiles(4, 8, 64, 64, 4096, 64, 4, smem) == (32, 32)  # float32 could go to 16, need not
    assert chunk._serial_tiles(2, 8, 64, 64, 4096, 64, 4, smem) == (32, 16)
    assert chunk._serial_tiles(8, 16, 64, 64, 4096, 64, 4, 100000) == (64, 32)  # two stages must fit
    q = torch.empty(16, 8, 1024, 64, dtype=torch.bfloat16)
    assert chunk._plan(16, 8, 64, 64, 1, 1024, True, 64, q) == (16, (64, 64))
    assert chunk._plan(16, 8, 64, 64, 1, 1024, False, 64, q)[1] is None  # bidirectional: partial sums


@pytest.mark.parametrize("ns", [1, 2, 17, 64, 130])
@pytest.mark.parametrize("reverse", [False, True])
def test_exclusive_scan_matches_reference(ns, reverse):
    """The run-state scan (several blocks of runs when ns > 64), with one huge run: the runs on the other side of it
    keep their digits (no cumsum - x)."""
    g = torch.Generator().manual_seed(ns)
    x = torch.randn(ns, 3, 5, 7, generator=g)
    x[ns // 2] *= 1e6
    y, ref = chunk.exclusive_scan(x, reverse), exclusive_scan_ref(x.double(), reverse)
    assert y.shape == x.shape and y.dtype == torch.float32
    bound = 1e-5 * (exclusive_scan_ref(x.double().abs(), reverse) + 1)  # float32 sums of at most 130 terms
    assert ((y.double() - ref).abs() <= bound).all()


def test_unmapped_features_and_split_heads_layout(poison):
    """feature_map=None (inputs already positive), q/k/v as split_heads makes them (strided views)."""
    g = torch.Generator().manual_seed(3)
    B, T, H, d = 2, 37, 2, 8
    x = [torch.rand(B, T, H * d, generator=g).view(B, T, H, d).transpose(1, 2).requires_grad_() for _ in range(3)]
    y = function.linear_attention_triton(*x, causal=True, feature_map=None)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, x, dy)
    x64 = [t.detach().double().requires_grad_() for t in x]
    y64 = linear_attention_ref(*x64, causal=True, feature_map=None)
    assert rel(y, y64) < 1e-5
    assert y.transpose(1, 2).is_contiguous()  # merge_heads is a view
    assert all(gr.stride() == t.stride() for gr, t in zip(grads, x))  # the grads too: no copy for the projections
    for a, b in zip(grads, torch.autograd.grad(y64, x64, dy.double())):
        assert rel(a, b) < 1e-5


@triton.jit
def _wcols_probe(X, W, O, LOWP: tl.constexpr):
    i, j = tl.arange(0, 16), tl.arange(0, 64)
    xT = chunk._cast(tl.load(X + i[:, None] * 64 + j[None, :]), LOWP)
    z = tl.dot(xT, chunk._wcols(tl.load(W + j), 32, LOWP))
    tl.store(O + i, tl.sum(z, 1))


@pytest.mark.parametrize("lowp", [0, 2])
def test_weighted_column_sums_keep_float32_weights(lowp):
    """The serial passes' X^T w as a dot with _wcols(w): with bf16 operands (LOWP 2, the interpreter's bf16) w is
    split over two columns, so the sum keeps ~16 of w's bits (one rounded column: ~8, a relative error ~1e-3)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 64, generator=g) + 0.1  # features: positive
    w = torch.randn(64, generator=g) * torch.exp(3 * torch.randn(64, generator=g))
    xr = x.bfloat16().float() if lowp == 2 else x
    out = torch.empty(16)
    _wcols_probe[(1,)](xr, w, out, LOWP=lowp)
    ref = xr.double() @ w.double()
    assert rel(out, ref) < 3e-5, rel(out, ref)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_feature_pass_is_the_kernels_map(dt, poison):
    """feature.py's elu + 1 pass: float32 math, then the input dtype, in the input's layout (split_heads' strided
    views, d not a power of two, rows not a multiple of the block); they are the features the chunk kernels would
    make themselves: the op's output is bit for bit that of the kernels mapping inside. float16 inputs keep the map
    inside the kernels (no features handed to the backward)."""
    from attnlab.kernels.linear_attn.feature import elu1_features
    from attnlab.kernels.linear_attn.reference import elu1
    g = torch.Generator().manual_seed(4)
    B, T, H, d = 2, 301, 3, 24
    x = (3 * torch.randn(B, T, H * d, generator=g)).to(dt).view(B, T, H, d).transpose(1, 2)
    phi = elu1_features(x)
    assert phi.dtype == dt and phi.stride() == x.stride()
    torch.testing.assert_close(phi, elu1(x.float()).to(dt))  # exp's last bit is the device's
    q, k, v = (torch.randn(1, 2, 130, 16, generator=g).to(dt) for _ in range(3))
    o, r, S0, z0, qf, kf = function._linear_attn_fwd(q, k, v, None, True, 1e-6, True)
    assert torch.equal(qf, elu1_features(q)) and torch.equal(kf, elu1_features(k))
    assert torch.equal(o, chunk.chunk_fwd(q, k, v, causal=True, elu1=True, norm=True)[0])
    assert function._linear_attn_fwd(*(t.half() for t in (q, k, v)), None, True, 1e-6, True)[4].numel() == 0


def test_float64_falls_back_and_bad_input_raises():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    assert rel(function.linear_attention_triton(q, k, v), linear_attention_ref(q, k, v)) < 1e-12
    with pytest.raises(ValueError, match="causal attention needs as many keys"):
        function.linear_attention_triton(q, k[:, :, :5], v[:, :, :5], causal=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        function.linear_attention_triton(q, k, v, key_padding_mask=torch.zeros(1, 9))
    with pytest.raises(ValueError, match="feature map"):
        function.linear_attention_triton(q, k, v, feature_map="relu")


@pytest.mark.parametrize("dt,sdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16)])
def test_step_matches_reference(dt, sdt, poison):
    g = torch.Generator().manual_seed(5)
    B, H, d, dv = 3, 2, 8, 40
    q, k = (torch.randn(B, H, d, generator=g).to(dt) for _ in range(2))
    v = torch.randn(B, H, dv, generator=g).to(dt)
    S, z = torch.rand(B, H, d, dv, generator=g).to(sdt), (torch.rand(B, H, d, generator=g) + 1).to(sdt)
    write = torch.tensor([True, False, True])
    S_before, z_before = S.clone(), z.clone()
    y, S1, z1 = recurrent.linear_attention_step_triton(q, k, v, S, z, write=write)
    y64, S64, z64 = linear_attention_step_ref(*(t.double() for t in (q, k, v, S, z)), write=write)
    assert y.dtype == S1.dtype == z1.dtype == torch.promote_types(dt, sdt)  # as the reference's arithmetic
    tol = TOL[sdt]
    assert rel(y, y64) < tol and rel(S1, S64) < tol and rel(z1, z64) < tol
    assert torch.equal(S, S_before) and torch.equal(z, z_before)  # the functional form leaves the state alone
    out = torch.full(v.shape, float("nan"), dtype=y.dtype)
    assert recurrent.linear_attention_step_(q, k, v, S, z, out, write=write) is out
    assert rel(out, y64) < tol and rel(S, S64) < tol and rel(z, z64) < tol
    assert torch.equal(S[1], S_before[1]) and torch.equal(z[1], z_before[1])  # write=False: state untouched


def test_steps_equal_parallel_form():
    """Stepping the in-place kernel over a sequence reproduces the chunked kernel's causal output."""
    g = torch.Generator().manual_seed(6)
    B, H, T, d, dv = 2, 2, 7, 8, 12
    q, k, v = torch.randn(B, H, T, d, generator=g), torch.randn(B, H, T, d, generator=g), \
        torch.randn(B, H, T, dv, generator=g)
    y = function.linear_attention_triton(q, k, v, causal=True)
    S, z, out = torch.zeros(B, H, d, dv), torch.zeros(B, H, d), torch.empty(B, H, dv)
    steps = []
    for t in range(T):
        recurrent.linear_attention_step_(q[:, :, t].contiguous(), k[:, :, t].contiguous(), v[:, :, t].contiguous(),
                                         S, z, out)
        steps.append(out.clone())
    assert rel(torch.stack(steps, 2), y) < 1e-5


def test_module_parallel_vs_recurrent_on_triton():
    """LinearAttention(backend='triton'): the chunked kernel (forward) against the step kernel (decoding)."""
    from attnlab.attention.checks import parallel_vs_recurrent
    from attnlab.attention.linear import LinearAttention
    torch.manual_seed(0)
    attn = LinearAttention(16, 2, "decoder", backend="triton")
    assert parallel_vs_recurrent(attn, B=3, T=9, dtype=torch.float32) < 1e-5


def test_custom_op_passes_opcheck():
    """attnlab::linear_attn_fwd is a torch.library custom op (so torch.compile / CUDA graphs take it): schema,
    fake implementation (shapes of the saved run states too), registered autograd and AOT dispatch, here on the
    interpreter. Causal with padding and 2 runs (the fake must predict the S0 / z0 shapes), and bidirectional."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, -3:] = True
    torch.library.opcheck(function.linear_attn_fwd, (q, k, v, None, False, 1e-6, True))
    old = dict(chunk.CONFIG)
    try:
        chunk.CONFIG.update(BT=64, programs=4, run_min_chunks=0, one_chunk_runs=0)
        q2, k2, v2 = (torch.randn(1, 2, 130, 8, generator=g, requires_grad=True) for _ in range(3))
        assert chunk.fwd_runs(q2, k2, v2, True) == (2, torch.float32)
        torch.library.opcheck(function.linear_attn_fwd, (q2, k2, v2, None, True, 1e-6, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        chunk.CONFIG.update(serial_programs=1)  # the serial pass: a state per chunk, bf16 for bf16 inputs
        q3, k3, v3 = (x.detach().to(torch.bfloat16).requires_grad_() for x in (q2, k2, v2))
        assert chunk.fwd_runs(q3, k3, v3, True) == (3, torch.bfloat16)
        torch.library.opcheck(function.linear_attn_fwd, (q3, k3, v3, None, True, 1e-6, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    finally:
        chunk.CONFIG.update(old)


def test_step_dispatch_falls_back_for_features_wider_than_the_kernel(monkeypatch):
    """backend='auto' where Triton would run (a GPU; here the interpreter stands in): features wider than 256 (e.g.
    Performer's random features) take the PyTorch step instead of failing; a forced backend='triton' still refuses."""
    import attnlab.kernels.linear_attn as op
    monkeypatch.setattr(op, "use_triton", lambda backend, *t: backend != "torch")
    calls = []
    real = recurrent.linear_attention_step_triton
    monkeypatch.setattr(recurrent, "linear_attention_step_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(7)
    for d, expect_kernel in [(8, True), (300, False)]:
        q, k = torch.randn(2, 1, d, generator=g), torch.randn(2, 1, d, generator=g)
        v, S, z = torch.randn(2, 1, 4, generator=g), torch.zeros(2, 1, d, 4), torch.zeros(2, 1, d)
        calls.clear()
        y = op.linear_attention_step(q, k, v, S, z)[0]
        ref = linear_attention_step_ref(*(t.double() for t in (q, k, v, S, z)))[0]
        assert bool(calls) == expect_kernel and rel(y, ref) < 1e-5
    with pytest.raises(ValueError, match="backend='torch'"):
        op.linear_attention_step(q, k, v, S, z, backend="triton")


def test_compiles_for_hopper(monkeypatch):
    """Every kernel that bf16 calls at the model's head width (d = 64) launch -- causal by runs, by the serial state
    pass, bidirectional, with padding, and the decode step -- compiles for sm_90 as launched: Triton's compiler
    checks what the interpreter lets through (e.g. a loop-carried variable changing type)."""
    from attnlab.kernels.linear_attn import linear_attention_step
    launches = record_launches(monkeypatch)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 130, 64, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
    mask = padding(1, 130, g)
    for mode in (4, "serial"):
        serial_mode(monkeypatch, mode)
        monkeypatch.setitem(chunk.CONFIG, "programs", 4 if mode == 4 else 0)
        monkeypatch.setitem(chunk.CONFIG, "run_min_chunks", 0)
        monkeypatch.setitem(chunk.CONFIG, "one_chunk_runs", 0)
        function.linear_attention_triton(q, k, v, causal=True, key_padding_mask=mask).float().sum().backward()
    function.linear_attention_triton(q, k, v, causal=False).float().sum().backward()
    S, z = torch.rand(1, 2, 64, 64), torch.rand(1, 2, 64) + 1
    linear_attention_step(q[:, :, 0].detach(), k[:, :, 0].detach(), v[:, :, 0].detach(), S, z, backend="triton")
    assert {"_prefix_kernel", "_state_kernel", "_bwd_chunk_kernel", "_step_kernel", "_elu1_kernel"} <= \
        {s[1] for s in launches}
    compiled = compile_for_sm90(as_on_gpu(launches))  # bf16 dots, as a GPU runs them
    if isinstance(compiled, str):
        pytest.skip(f"no sm_90 toolchain here: {compiled}")
    # the serial state pass's dots take both operands straight from the shared memory its loads fill: a select on a
    # loaded tile (a mask the load had applied already) sent the tile through registers and back in every serial
    # step (session 16 in kernels/NOTES.md: that pass 0.164 -> 0.137 ms at B=8, H=16, T=4096)
    sass = compile_for_sm90([s for s in as_on_gpu(launches) if s[1] == "_prefix_kernel"], report="sass")
    hgmma = [ln.strip() for ln in sass.splitlines() if "HGMMA" in ln]
    assert hgmma and not [ln for ln in hgmma if re.search(r"HGMMA\S* R\d+, R\d+", ln)], hgmma[:4]
