"""MemSizer Triton path (the linear-attention chunk kernels in row-scale mode, the step kernel in count mode)
against the float64 reference, run on the CPU by Triton's interpreter (switched on in conftest.py)."""
import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("numpy")

import attnlab.kernels.linear_attn.chunk as chunk  # noqa: E402
import attnlab.kernels.memsizer.function as function  # noqa: E402
import attnlab.kernels.memsizer.recurrent as ms_recurrent  # noqa: E402
from kernel_utils import TOL, as_on_gpu, compile_for_sm90, record_launches, rel, run_id, serial_mode  # noqa: E402
from attnlab.kernels.memsizer.reference import memsizer_ref, memsizer_step_ref  # noqa: E402


def inputs(B, T, S, k, d, dt, g):
    p = torch.randn(B, T, k, generator=g).softmax(-1)
    a = torch.randn(B, S, k, generator=g)  # the module's a is a LayerNorm output: signed
    v = torch.randn(B, S, d, generator=g)
    return [x.to(dt).requires_grad_() for x in (p, a, v)]


# (causal, B, T, S, k slots, d, dtype, mask, causal runs (CONFIG["programs"]))
CASES = [
    (True, 2, 63, 63, 4, 40, torch.float32, True, 0),
    (True, 2, 129, 129, 8, 300, torch.bfloat16, True, 0),    # d = 300: two dv-tiles, dp/da partials
    (True, 2, 129, 129, 32, 24, torch.float32, True, 64),    # split into runs
    (True, 2, 129, 129, 32, 24, torch.float32, True, "serial"),  # the serial state pass, no normalizer
    (True, 1, 192, 192, 8, 80, torch.bfloat16, True, "serial32"),  # bf16 states, 3 dv-tiles of the pass
    (True, 1, 1, 1, 4, 20, torch.float16, False, 0),
    (False, 2, 63, 129, 16, 48, torch.bfloat16, True, 0),
    (False, 2, 1, 70, 4, 20, torch.float32, True, 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'causal' if c[0] else 'bidir'}-T{c[2]}-S{c[3]}-k{c[4]}-"
                         f"d{c[5]}-{str(c[6])[6:]}{'-mask' if c[7] else ''}{run_id(c[8])}")
def test_memsizer_matches_reference(case, poison, monkeypatch):
    causal, B, T, S, k, d, dt, use_mask, programs = case
    serial, programs, passes = serial_mode(monkeypatch, programs)
    monkeypatch.setitem(chunk.CONFIG, "programs", programs)
    monkeypatch.setitem(chunk.CONFIG, "run_min_chunks", 0 if programs else 10 ** 9)  # runs only when asked
    monkeypatch.setitem(chunk.CONFIG, "one_chunk_runs", 0)  # as many as "programs" asks (tested below)
    g = torch.Generator().manual_seed(T * 17 + k)
    xs = inputs(B, T, S, k, d, dt, g)
    mask = None
    if use_mask:
        mask = torch.rand(B, S, generator=g) < 0.3
        mask[0], mask[-1, :3] = False, True  # a row whose first keys are padding: count clamped to 1
    dy = torch.randn(B, T, d, generator=g).to(dt)
    y = function.memsizer_triton(*xs, causal, key_padding_mask=mask)
    grads = torch.autograd.grad(y, xs, dy)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    y64 = memsizer_ref(*x64, causal, key_padding_mask=mask)
    assert y.dtype == dt and y.shape == (B, T, d)
    assert rel(y, y64) < TOL[dt], rel(y, y64)
    assert passes == ([False, True] if serial else []), passes
    for name, a, b in zip(("dp", "da", "dv"), grads, torch.autograd.grad(y64, x64, dy.double())):
        assert rel(a, b) < TOL[dt], (name, rel(a, b))


def test_float64_falls_back_and_bad_input_raises():
    g = torch.Generator().manual_seed(2)
    p, a, v = (x.detach().double() for x in inputs(2, 9, 9, 4, 6, torch.float32, g))
    assert rel(function.memsizer_triton(p, a, v, True), memsizer_ref(p, a, v, True)) < 1e-12
    with pytest.raises(ValueError, match="as many queries as keys"):
        function.memsizer_triton(p, a[:, :5], v[:, :5], True)
    with pytest.raises(ValueError, match="share one dtype"):
        function.memsizer_triton(p.float(), a, v, False)


@pytest.mark.parametrize("dt,cdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_step_matches_reference(dt, cdt, poison):
    g = torch.Generator().manual_seed(3)
    B, k, d = 3, 8, 300
    p = torch.randn(B, k, generator=g).softmax(-1).to(dt)
    a, v = torch.randn(B, k, generator=g).to(dt), torch.randn(B, d, generator=g).to(dt)
    S = torch.randn(B, k, d, generator=g).to(dt)
    count = torch.tensor([0.0, 5.0, 300.0], dtype=cdt)  # 0: the count is clamped to 1 after a padded step
    write = torch.tensor([False, True, True])
    S_before, c_before = S.clone(), count.clone()
    y, S1, c1 = ms_recurrent.memsizer_step_triton(p, a, v, S, count, write=write)
    yr, Sr, cr = memsizer_step_ref(p, a, v, S, count, write=write)
    y64, S64, c64 = memsizer_step_ref(*(t.double() for t in (p, a, v, S, count)), write=write)
    assert (y.dtype, S1.dtype, c1.dtype) == (yr.dtype, Sr.dtype, cr.dtype)
    assert rel(y, y64) < TOL[dt] and rel(S1, S64) < TOL[dt] and torch.equal(c1.double(), c64)
    assert torch.equal(S, S_before) and torch.equal(count, c_before)
    out = torch.full((B, d), float("nan"), dtype=y.dtype)
    assert ms_recurrent.memsizer_step_(p, a, v, S, count, out, write=write) is out
    assert rel(out, y64) < TOL[dt] and rel(S, S64) < TOL[dt] and torch.equal(count.double(), c64)
    assert torch.equal(S[0], S_before[0])  # write=False: state untouched


def test_steps_equal_parallel_form():
    g = torch.Generator().manual_seed(4)
    B, T, k, d = 2, 7, 4, 24
    p, a, v = (x.detach() for x in inputs(B, T, T, k, d, torch.float32, g))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, :2] = True
    y = function.memsizer_triton(p, a, v, True, key_padding_mask=mask)
    S, count, out, steps = torch.zeros(B, k, d), torch.zeros(B), torch.empty(B, d), []
    for t in range(T):
        ms_recurrent.memsizer_step_(p[:, t].contiguous(), a[:, t].contiguous(), v[:, t].contiguous(), S, count, out,
                                    write=~mask[:, t])
        steps.append(out.clone())
    assert rel(torch.stack(steps, 1), y) < 1e-5


def test_module_parallel_vs_recurrent_on_triton():
    """MemSizerAttention(backend='triton'): the chunked kernel (forward) against the step kernel (decoding)."""
    from attnlab.attention.checks import parallel_vs_recurrent
    from attnlab.attention.memsizer import MemSizerAttention
    torch.manual_seed(0)
    attn = MemSizerAttention(16, 2, "decoder", k=4, backend="triton")
    assert parallel_vs_recurrent(attn, B=3, T=9, dtype=torch.float32) < 1e-5


def test_custom_op_passes_opcheck(monkeypatch):
    """attnlab::memsizer_fwd: schema, fake implementation, registered autograd and AOT dispatch (interpreter); also
    through the serial state pass, whose bf16 per-chunk states the fake must predict."""
    g = torch.Generator().manual_seed(8)
    p, a, v = inputs(2, 20, 20, 4, 12, torch.float32, g)
    torch.library.opcheck(function.memsizer_fwd, (p, a, v, None, True))
    monkeypatch.setitem(chunk.CONFIG, "serial_programs", 1)
    p, a, v = inputs(1, 130, 130, 8, 16, torch.bfloat16, g)
    torch.library.opcheck(function.memsizer_fwd, (p, a, v, None, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiles_for_hopper(monkeypatch):
    """Every kernel that bf16 calls of the paper's shapes (k = 32 slots, d = 64) launch -- causal by runs and by the
    serial state pass, bidirectional, with padding, and the decode step -- compiles for sm_90 as launched."""
    launches = record_launches(monkeypatch)
    g = torch.Generator().manual_seed(6)
    xs = inputs(1, 130, 130, 32, 64, torch.bfloat16, g)
    mask = torch.rand(1, 130, generator=g) < 0.3
    for mode in (4, "serial"):
        serial_mode(monkeypatch, mode)
        monkeypatch.setitem(chunk.CONFIG, "programs", 4 if mode == 4 else 0)
        monkeypatch.setitem(chunk.CONFIG, "run_min_chunks", 0)
        monkeypatch.setitem(chunk.CONFIG, "one_chunk_runs", 0)
        function.memsizer_triton(*xs, True, key_padding_mask=mask).float().sum().backward()
    function.memsizer_triton(*xs, False).float().sum().backward()
    p, a, v = (x[:, 0].detach() for x in xs)
    ms_recurrent.memsizer_step_triton(p, a, v, torch.randn(1, 32, 64), torch.ones(1))
    assert {"_prefix_kernel", "_bwd_chunk_kernel"} <= {s[1] for s in launches}
    compiled = compile_for_sm90(as_on_gpu(launches))  # bf16 dots, as a GPU runs them
    if isinstance(compiled, str):
        pytest.skip(f"no sm_90 toolchain here: {compiled}")
