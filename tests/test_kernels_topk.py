"""Fused top-k attention Triton kernels against the float64 dense reference, run on the CPU by Triton's interpreter:
both algorithms, the threshold kernels (threshold.py, every T up to function.THRESHOLD_MAX_T) and the sparse P/I kernels
(chunk.py, longer T).

The interpreter is switched on in conftest.py, before anything imports Triton.
The interpreter runs Triton's bitonic sort element by element in Python, so tiles are shrunk (CFG) and shapes
kept small; the full-size check is bench/check_topk_gpu.py on a GPU. The GPU-only sweep ('fast': tensor-core
prefix counts, inline-PTX stores) is covered there, not here; test_compiles_for_hopper compiles the threshold
kernels for sm_90 (the interpreter does not type-check loop-carried variables, the compiler does)."""
import re

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("numpy")

import attnlab.kernels.topk_attn.chunk as chunk  # noqa: E402
import attnlab.kernels.topk_attn.threshold as threshold  # noqa: E402
import attnlab.kernels.topk_attn.function as function  # noqa: E402
from kernel_utils import TOL, as_on_gpu, compile_for_sm90, record_launches, rel, shared_memory  # noqa: E402
from attnlab.kernels.topk_attn import topk_attention  # noqa: E402
from attnlab.kernels.topk_attn.reference import attention_over, threshold_keep, topk_attention_dense  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison")
# small tiles: 8 groups, 16 candidate slots, 2 persistent programs (several tiles each)
CFG = dict(BM=16, BN=8, CAP=16, BS=16, KC=4, BMB=16, progs_per_sm=1)
# 8 groups: 24 kept scores per row in A; other key tiles in the forward and backward
THRESHOLD_CFG = dict(BM=16, BM_sel=16, BN_A=8, keep_A=4, BN=8, BN_fwd=16, BN_idx=32, BN_dq=8, BM_kv=8, BN_kv=16)
DEFAULT_CFG = {"chunk": dict(chunk.CONFIG), "threshold": dict(threshold.CONFIG)}  # the GPU's, before small_tiles


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(chunk, "CONFIG", {**chunk.CONFIG, **CFG})
    monkeypatch.setattr(threshold, "CONFIG", {**threshold.CONFIG, **THRESHOLD_CFG})


def use_path(monkeypatch, name):
    """Send topk_attention_triton down one algorithm for every T: threshold, threshold-atomic (the threshold kernels
    with dq by atomics, CONFIG["atomic_dq"]), threshold-sparse (the threshold forward, the sparse backward from the
    log-sum-exp and key indices it stores) or sparse."""
    monkeypatch.setattr(function, "THRESHOLD_MAX_T", 0 if name == "sparse" else 1 << 62)
    monkeypatch.setitem(threshold.CONFIG, "sparse_bwd_T", 0 if name == "threshold-sparse" else 1 << 62)
    monkeypatch.setitem(threshold.CONFIG, "atomic_dq", name == "threshold-atomic")


@pytest.fixture(params=["threshold", "threshold-atomic", "threshold-sparse", "sparse"])
def path(request, monkeypatch):
    """Which algorithm topk_attention_triton takes (for every T)."""
    use_path(monkeypatch, request.param)
    return request.param


@pytest.fixture
def sparse(monkeypatch):
    monkeypatch.setattr(function, "THRESHOLD_MAX_T", 0)


def inputs(B, H, T, S, d=16, dv=16, dtype=torch.float32, seed=0, pad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, e, generator=g).to(dtype) for n, e in ((T, d), (S, d), (S, dv)))
    kpm = None
    if pad:
        kpm = torch.rand(B, S, generator=g) < 0.3
        kpm[0] = False
        if B > 1:
            kpm[-1] = True  # a sequence with no key at all: its outputs are 0
    return q, k, v, kpm


def check(q, k, v, topk, causal, kpm=None, scale=None, seed=1):
    """Output and q/k/v gradients of the kernel against the float64 dense reference on the same inputs."""
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    out = function.topk_attention_triton(qt, kt, vt, topk, causal, key_padding_mask=kpm, scale=scale)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = topk_attention_dense(qr, kr, vr, topk, causal, kpm, scale=scale)
    ref.backward(dout.double())
    tol = TOL[q.dtype]
    assert out.dtype == q.dtype and not out.isnan().any()
    for name, a, b in (("out", out, ref), ("dq", qt.grad, qr.grad), ("dk", kt.grad, kr.grad),
                       ("dv", vt.grad, vr.grad)):
        assert a.dtype == q.dtype and not a.isnan().any(), name
        if b.norm() == 0:  # e.g. dq with one visible key: dP - delta is 0 up to rounding (two summation orders)
            assert a.double().norm() < 1e-5, name
        else:
            assert rel(a, b) < tol, (name, rel(a, b))


@pytest.mark.parametrize("B,H,T,S,topk,causal,pad", [
    (2, 1, 1, 1, 4, False, False),      # one query, one key
    (1, 2, 63, 63, 4, True, False),     # causal, T not a multiple of the tiles
    (2, 1, 63, 63, 5, False, True),     # k not a power of two, padding, one sequence fully padded
    (2, 1, 5, 63, 4, True, True),       # queries at the end of a longer key sequence (KV cache)
    (1, 1, 63, 5, 3, True, False),      # more queries than keys: the first rows see no key at all
    (1, 1, 129, 129, 4, True, True),    # several key tiles per row, longer rows than CAP
    (1, 1, 9, 9, 100, False, True),     # k > length: softmax over every visible key
])
def test_matches_dense_fp32(B, H, T, S, topk, causal, pad, path):
    q, k, v, kpm = inputs(B, H, T, S, seed=T * 7 + S, pad=pad)
    check(q, k, v, topk, causal, kpm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_dense_half(dtype, path):
    q, k, v, kpm = inputs(2, 1, 63, 63, dtype=dtype, seed=3, pad=True)
    check(q, k, v, 4, True, kpm, scale=0.3)


def overflowing_rows(q, k, topk, causal, kpm, BN, CAP):
    """How many rows have more than CAP scores >= the k-th largest of their BN group maxima (what sweep 2 sees)."""
    s = (q.double() @ k.double().transpose(-1, -2))
    T, S = s.shape[-2:]
    ok = torch.ones(T, S, dtype=torch.bool).tril(S - T) if causal else torch.ones(T, S, dtype=torch.bool)
    ok = ok[None, None] if kpm is None else ok[None, None] & ~kpm[:, None, None, :]
    s = s.masked_fill(~ok, float("-inf"))
    g = torch.nn.functional.pad(s, (0, (-S) % BN), value=float("-inf")).unflatten(-1, (-1, BN)).amax(-2)
    tau = g.topk(min(topk, BN), -1).values[..., -1:]
    return int(((s >= tau) & ok).sum(-1).gt(CAP).sum())


def test_refinement_when_candidates_overflow(monkeypatch, sparse):
    """k = 16 with 16 groups and 32 candidate slots: tau is the smallest group maximum, far too low for 129 keys,
    so rows overflow and take the refinement sweeps (some twice)."""
    monkeypatch.setattr(chunk, "CONFIG", {**chunk.CONFIG, "BN": 16, "CAP": 32})
    q, k, v, kpm = inputs(2, 1, 17, 129, seed=5, pad=True)
    assert overflowing_rows(q, k, 16, False, kpm, BN=16, CAP=32) > 10  # the path under test is really taken
    check(q, k, v, 16, False, kpm)


def test_ties_any_valid_choice(monkeypatch):
    """Zero queries (every score ties) and duplicated keys: any top-k among ties is right, so check the selection
    itself: k distinct visible keys whose scores are >= every unselected one, P their softmax, out = sum P v."""
    monkeypatch.setattr(chunk, "CONFIG", {**chunk.CONFIG, "CAP": 8})
    q, k, v, _ = inputs(1, 1, 20, 40, seed=9)
    q[:, :, :6] = 0                       # 40 tied scores: more than the 8 slots, refinement must break ties
    k[:, :, 20:30] = k[:, :, 10:11]
    topk, scale = 4, 0.25
    s = (q.double() @ k.double().transpose(-1, -2))[0, 0]
    few = torch.ones(1, 40, dtype=torch.bool)
    few[0, [3, 21, 25]] = False  # 3 visible keys (< topk), two of them tied: the 4th slot must stay empty
    for kpm in (None, few):
        out, P, I = chunk.topk_fwd(q, k, v, topk, False, kpm, scale)
        visible = torch.ones(40, dtype=torch.bool) if kpm is None else ~kpm[0]
        n = min(topk, int(visible.sum()))
        for i in range(20):
            sel = I[0, 0, i, :n].long()
            assert (sel >= 0).all() and sel.unique().numel() == n and visible[sel].all()
            rest = visible.clone()
            rest[sel] = False
            if rest.any():
                assert s[i, sel].min() >= s[i][rest].max() - 1e-5
            p = torch.softmax(s[i, sel] * scale, 0)
            torch.testing.assert_close(P[0, 0, i, :n].double(), p, atol=1e-6, rtol=0)
            # empty slots (only when fewer than topk keys are visible) carry no weight and no index
            assert (P[0, 0, i, n:] == 0).all() and (I[0, 0, i, n:] == -1).all()
            torch.testing.assert_close(out[0, 0, i].double(), p @ v[0, 0, sel].double(), atol=1e-5, rtol=0)
        assert n < topk or kpm is None  # the padded case really has empty slots to check


def test_sort_path_without_tl_topk(monkeypatch, sparse):
    """Triton builds without tl.topk take a full tl.sort of the candidates instead."""
    monkeypatch.setattr(chunk, "HAS_TOPK", False)
    q, k, v, kpm = inputs(2, 1, 33, 33, seed=11, pad=True)
    check(q, k, v, 3, True, kpm)


def test_dispatch_and_errors():
    q, k, v, kpm = inputs(1, 2, 3, 6, seed=13, pad=True)
    out = topk_attention(q, k, v, 2, True, kpm, backend="triton")
    torch.testing.assert_close(out.double(), topk_attention_dense(q.double(), k.double(), v.double(), 2, True, kpm),
                               atol=1e-5, rtol=0)
    long_k = torch.randn(1, 2, 200, 16)
    with pytest.raises(ValueError, match="topk=129"):
        function.topk_attention_triton(q, long_k, long_k, 129, False)
    with pytest.raises(ValueError, match="scale must be > 0"):
        function.topk_attention_triton(q, k, v, 2, False, scale=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        function.topk_attention_triton(q.double(), k.double(), v.double(), 2, False)


def sweeps(q, k, v, topk, causal):
    """R sweeps per selection tile of the threshold kernels on these inputs (threshold.selection_stats)."""
    return threshold.selection_stats(q, k, v, topk, causal)[..., 1]


def test_threshold_count_sweeps_repeat(monkeypatch):
    """4 groups keeping 3 scores each (12 per row; also the path of CONFIG["keep_A"] = 3) for k = 10 of 129 keys:
    sweep A's bound is loose, rows have many extra scores above it and their groups' lists run out, so R repeats
    (raising its bound each time) before the masked forward."""
    monkeypatch.setattr(threshold, "CONFIG", {**threshold.CONFIG, "BN_A": 4, "BN": 4, "keep_A": 3, "pops": 8,
                                                   "slack": 2})
    q, k, v, kpm = inputs(2, 1, 40, 129, seed=5, pad=False)
    n3 = sweeps(q, k, v, 10, False)
    assert (n3 >= 3).all()  # the path under test is really taken
    monkeypatch.setitem(threshold.CONFIG, "keep_A", 4)  # 16 kept scores per row: a tighter bound, fewer sweeps
    assert sweeps(q, k, v, 10, False).sum() < n3.sum()
    monkeypatch.setitem(threshold.CONFIG, "keep_A", 3)
    check(q, k, v, 10, False)
    check(q, k, v, 10, True, seed=2)


@pytest.mark.parametrize("bn_a", [16, 4])
def test_threshold_two_kept_per_group(monkeypatch, bn_a):
    """Sweep A keeping the 2 largest scores of each of BN_A groups (CONFIG["keep_A"] = 2; wider key tiles in A than
    in R): exact for causal and padded rows; with 4 groups (8 kept scores for k = 10) there is no bound and R counts
    every score, with 16 groups R starts from the bisection's bound."""
    monkeypatch.setattr(threshold, "CONFIG", {**threshold.CONFIG, "BN_A": bn_a, "keep_A": 2, "pops": 12})
    q, k, v, kpm = inputs(2, 1, 40, 129, seed=5, pad=True)
    check(q, k, v, 10, False, kpm)
    check(q, k, v, 10, True, seed=2)
    q, k, v, _ = inputs(1, 2, 70, 70, seed=9, dtype=torch.bfloat16)
    check(q, k, v, 6, True)


@pytest.mark.parametrize("pops", [2, 6])
def test_threshold_pops_resolve_extra_scores(monkeypatch, pops):
    """A bisection that stops at up to k + 4 kept scores leaves R up to ~4 extra scores per row: popping 6 of the
    smallest resolves most in one sweep, popping 2 needs more sweeps; both exact."""
    monkeypatch.setattr(threshold, "CONFIG", {**threshold.CONFIG, "slack": 4, "pops": pops})
    q, k, v, kpm = inputs(2, 1, 40, 129, seed=5, pad=False)
    n = sweeps(q, k, v, 10, False).sum().item()
    monkeypatch.setattr(threshold, "CONFIG", {**threshold.CONFIG, "pops": 8 - pops})
    assert (n < sweeps(q, k, v, 10, False).sum().item()) == (pops == 6)
    monkeypatch.setattr(threshold, "CONFIG", {**threshold.CONFIG, "pops": pops})
    check(q, k, v, 10, False)


def test_threshold_coarse_bound(monkeypatch):
    """A 12-bit bisection: a lower bound L further below the k-th kept score, more for R to remove."""
    monkeypatch.setattr(threshold, "CONFIG", {**threshold.CONFIG, "SEL_BITS": 12})
    q, k, v, kpm = inputs(1, 2, 70, 70, seed=8, pad=True)
    check(q, k, v, 6, True, kpm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threshold_ties_split_by_key_index(dtype):
    """Duplicated keys tie at the k-th score (and zero queries tie everywhere): the threshold path splits the tie
    by key index (sweep T). The selection holds exactly k keys, none scoring below an unselected one, and out and
    the gradients are those of that selection (float64 reference over the same keys)."""
    q, k, v, _ = inputs(1, 1, 20, 40, seed=9, dtype=dtype)
    q[:, :, :6] = 0
    k[:, :, 20:30] = k[:, :, 10:11]
    topk, scale = 4, 0.25
    _, _, t, tj, _ = threshold.threshold_fwd(q, k, v, topk, False, None, scale)
    assert (tj > 0).sum() >= 6  # the tie split really ran
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out = function.topk_attention_triton(qt, kt, vt, topk, False, scale=scale)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(dout)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = qr @ kr.transpose(-1, -2)
    keep = threshold_keep(s, t, tj)
    assert (keep.sum(-1) == topk).all()
    assert (s.masked_fill(~keep, float("inf")).amin(-1) >= s.masked_fill(keep, float("-inf")).amax(-1) - 1e-6).all()
    ref = attention_over(s * scale, keep, vr)
    ref.backward(dout.double())
    for name, a, b in (("out", out, ref), ("dq", qt.grad, qr.grad), ("dk", kt.grad, kr.grad),
                       ("dv", vt.grad, vr.grad)):
        assert rel(a, b) < TOL[dtype], (name, rel(a, b))


def test_threshold_tie_at_zero():
    """The k-th score is exactly +0.0 (zero keys), reached by R's pops from below 0: with 8 groups of 5 keys and
    4 kept per group, sweep A misses zeros (groups 0-3 hold 5 keys >= 0 each), so L < 0 and R pops up through the
    negative scores to a tie at +0.0. The tie split then selects s >= +0.0 for keys below tj, and -0.0 == +0.0:
    the float below +0.0 is the negative denormal (threshold._below), not -0.0, which would drop the zero keys."""
    assert threshold.CONFIG["BN_A"] == 8 and threshold.CONFIG["keep_A"] == 4  # the layout below is for 8 groups
    g = torch.Generator().manual_seed(21)
    q = torch.zeros(1, 1, 6, 16)
    q[..., 0] = 0.5 + torch.rand(6, generator=g)
    k = torch.randn(1, 1, 40, 16, generator=g)
    k[..., 0] = -0.5 - torch.rand(40, generator=g)                 # below 0 ...
    pos = [0, 8, 16, 1, 9, 17, 2, 10, 18, 3, 11, 19, 27, 4, 12]    # ... but 15 keys above 0 (groups 0-4) ...
    zero = [24, 25, 26, 32, 33, 34, 35]                            # ... and 7 at exactly +0.0 (groups 0-3)
    k[..., pos, 0] = 0.5 + torch.rand(15, generator=g)
    k[..., zero, :] = 0
    v = torch.randn(1, 1, 40, 16, generator=g)
    out, _, t, tj, _ = threshold.threshold_fwd(q, k, v, 20, False, None, 0.25)
    assert (t == 0).all() and (tj == 34).all()  # zeros 24, 25, 26, 32, 33 complete the top 20
    s = q.double() @ k.double().transpose(-1, -2)
    keep = threshold_keep(s, t, tj)
    assert (keep.sum(-1) == 20).all() and keep[..., [24, 25, 26, 32, 33]].all()
    assert rel(out, attention_over(s * 0.25, keep, v.double())) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_threshold_indices_are_the_selection(monkeypatch, dtype, causal):
    """indices=True: the masked forward also gives each row's selected keys for the sparse backward (through its
    per-tile bit masks, threshold._decode_kernel). I holds exactly the keys of (t, tj) (ties split as the mask
    splits them; in any order), and a row with fewer than k visible keys (padding; causal rows near the start)
    ends in -1. Key tiles of 32 (two mask words) and 64 (three), and lists too large for one launch (one head per
    launch, each decoded before the next); the output is that of the forward without indices (the same bits with
    the same key tiles)."""
    q, k, v, _ = inputs(2, 1, 70, 70, seed=9, dtype=dtype)
    q[:, :, :6] = 0                      # every score ties
    k[:, :, 20:30] = k[:, :, 10:11]      # ties at the k-th score
    kpm = None
    if not causal:
        kpm = torch.zeros(2, 70, dtype=torch.bool)
        kpm[1, 3:] = True                # 3 visible keys < k
    topk, scale = 30, 0.25
    s = q.double() @ k.double().transpose(-1, -2)
    vis = torch.ones(70, 70, dtype=torch.bool).tril() if causal else ~kpm[:, None, None, :]
    for bn, list_bytes in ((32, 1 << 30), (64, 1 << 30), (64, 1)):
        monkeypatch.setitem(threshold.CONFIG, "list_bytes", list_bytes)
        monkeypatch.setitem(threshold.CONFIG, "BN_idx", bn)
        monkeypatch.setitem(threshold.CONFIG, "BN_fwd", bn)
        out, _, t, tj, I = threshold.threshold_fwd(q, k, v, topk, causal, kpm, scale, indices=True)
        assert (tj > 0).any()  # the tie split really ran
        keep = threshold_keep(s, t, tj) & vis
        n = keep.sum(-1, keepdim=True)
        assert (n == vis.sum(-1, keepdim=True).clamp(max=topk)).all() and (n < topk).any()
        want = torch.where(keep, torch.arange(70).expand_as(keep), 1 << 30).sort(-1).values[..., :topk]
        got = torch.where(I < 0, 1 << 30, I).sort(-1).values  # key order, the empty slots last
        assert torch.equal(got.long(), want)
        assert ((I < 0).sum(-1, keepdim=True) == topk - n).all()
        assert torch.equal(out, threshold.threshold_fwd(q, k, v, topk, causal, kpm, scale)[0])


def test_sparse_backward_only_where_it_pays(monkeypatch):
    """The threshold forward finds key indices for the sparse backward only from CONFIG["sparse_bwd_T"] query rows,
    when a gradient will be taken, and not under torch.use_deterministic_algorithms (the sparse backward adds dK,
    dV with float32 atomics, in a varying order)."""
    monkeypatch.setitem(threshold.CONFIG, "sparse_bwd_T", 64)
    q, k, v, _ = inputs(1, 1, 64, 64)
    seen, real = [], function.threshold_fwd
    monkeypatch.setattr(function, "threshold_fwd", lambda *a, **kw: seen.append(kw["indices"]) or real(*a, **kw))
    function.topk_attention_triton(q, k, v, 4, True)                            # no gradient wanted
    qg = q.clone().requires_grad_()
    function.topk_attention_triton(qg, k, v, 4, True).sum().backward()           # a gradient, 64 rows
    function.topk_attention_triton(qg[:, :, 1:], k, v, 4, True).sum().backward()  # 63 rows
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    function.topk_attention_triton(qg, k, v, 4, True).sum().backward()
    assert seen == [False, True, False, False]


def test_compiles_for_hopper(monkeypatch):
    """Every kernel launched by a bf16 call of the GPU's default tiles (d = 64, k = 64; causal with padding and
    bidirectional; threshold and sparse kernels, the sparse forward with its GPU-only inline-PTX sweep; and the
    float32 threshold kernels), in the variant a GPU launches (tensor-core dots, aligned shapes: as_on_gpu),
    compiles for sm_90: Triton's compiler checks what the interpreter lets through (a loop-carried variable changing
    type once broke the GPU build of the threshold kernels). The threshold kernels' shared memory is within
    function.THRESHOLD_SMEM, and their bf16 variants spill little."""
    monkeypatch.setattr(chunk, "CONFIG", {**DEFAULT_CFG["chunk"], "progs_per_sm": 1})
    monkeypatch.setattr(threshold, "CONFIG", dict(DEFAULT_CFG["threshold"]))
    monkeypatch.setattr(chunk, "_num_sms", lambda device: 1)
    q, k, v, kpm = inputs(1, 1, 65, 65, d=64, dv=64, dtype=torch.bfloat16, seed=16, pad=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    launches = record_launches(monkeypatch)
    for path in ("threshold", "threshold-atomic", "threshold-sparse", "sparse"):
        use_path(monkeypatch, path)
        function.topk_attention_triton(q, k, v, 64, True, key_padding_mask=kpm).float().sum().backward()
        function.topk_attention_triton(q, k, v, 64, False).float().sum().backward()
    use_path(monkeypatch, "threshold")  # float32: tiles of twice the bytes, fewer pipeline stages
    function.topk_attention_triton(*(t.float() for t in (q, k, v)), 64, True).sum().backward()
    assert {s[1] for s in launches} >= {"_select_kernel", "_bwd_dkdv_kernel", "_fwd_kernel", "_bwd_kernel",
                                        "_bwd_dq_kernel", "_delta_kernel", "_decode_kernel"}
    # with the GPU-only paths (FAST) the interpreter skips; ptxas's report too
    report = compile_for_sm90(as_on_gpu(launches), report=True)
    if "NO-TOOLCHAIN" in report:
        pytest.skip(f"no sm_90 toolchain here: {report}")
    # the threshold kernels' tiles are not fitted to the device: THRESHOLD_SMEM sends a GPU with less shared
    # memory per block to the sparse kernels, so it must cover what they ask for
    compiled = shared_memory(report)
    smem = {s[1]: compiled[s[1]] for s in launches if s[0].endswith("threshold")}
    assert max(smem.values()) <= function.THRESHOLD_SMEM, smem
    # ptxas serializes every tensor-core dot of a kernel where it cannot keep one in flight (C7515): the dk/dv
    # kernel's loop, which LLVM could not prove runs at least once, cost it 8-9% (NOTES.md, session 13)
    assert "C7515" not in report, [ln for ln in report.splitlines() if "C7515" in ln]
    # a register cap (fit.reg_cap) is for the variants it was measured on: capping the forward that also finds
    # indices at the plain forward's 128 spilled 520 bytes and cost the op 14 ms at T = 16384 (NOTES.md, session 17).
    # The most any bf16 variant spills now: 168 bytes, the dq kernel with padding (mostly in its tie-split loop)
    lines = [ln for ln in report.splitlines() if ln.startswith("REPORT ")]
    assert len(lines) == len(launches)
    spills = {}
    for spec, ln in zip(launches, lines):
        if spec[0].endswith("threshold") and spec[3].get("Q") == "*bf16":
            n = int(re.search(r"(\d+) bytes spill stores", ln).group(1))
            spills[spec[1]] = max(spills.get(spec[1], 0), n)
    assert max(spills.values()) <= 192, spills


def test_threshold_atomic_dq_not_when_deterministic(monkeypatch):
    """atomic_dq adds dq in a varying order; under torch.use_deterministic_algorithms the dq kernel runs instead,
    and both give the float64 reference's gradients."""
    monkeypatch.setitem(threshold.CONFIG, "atomic_dq", True)
    q, k, v, kpm = inputs(1, 2, 21, 21, seed=17, pad=True)
    launches = record_launches(monkeypatch)
    check(q, k, v, 4, True, kpm)
    assert "_delta_kernel" in {s[1] for s in launches}
    launches.clear()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    check(q, k, v, 4, True, kpm)
    names = {s[1] for s in launches}
    assert "_bwd_dq_kernel" in names and "_delta_kernel" not in names


def test_threshold_op_passes_opcheck():
    """The threshold kernels' custom op: schema, fake implementation (shapes and dtypes of out, lse, t, tj, I)
    and autograd registration, as torch.compile relies on them (causal with padding, and bidirectional; the dense
    masked backward and the sparse one)."""
    q, k, v, kpm = inputs(2, 1, 9, 9, seed=12, pad=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for sparse_bwd in (False, True):
        torch.library.opcheck(function.topk_threshold_fwd, (q, k, v, kpm, 3, True, 0.25, sparse_bwd))
        torch.library.opcheck(function.topk_threshold_fwd, (q, k, v, None, 4, False, 0.25, sparse_bwd))


def test_threshold_top_k_in_one_group():
    """Adversarial for sweep A: every key of group 0 (j = 0 mod 8) outscores all others, so a row's top k = 10 sit
    in one group, which keeps only 4 of them. R's pops use up that group's list after 3, so R raises its bound
    and sweeps again, several times, and the result is still exact."""
    q, k, v, _ = inputs(1, 1, 24, 129, seed=14)
    u = torch.randn(16, generator=torch.Generator().manual_seed(15))
    q += 3 * u
    k[:, :, ::8] += 3 * u  # group 0 of 8: 17 keys, all above every other score of a row
    assert (sweeps(q, k, v, 10, False) >= 2).all()  # group 0's list runs out: R sweeps again
    check(q, k, v, 10, False)


def test_threshold_split_heads_layout_is_read_in_place(monkeypatch):
    """The model's split heads (a transposed view of (B, T, H, d)) go to the threshold kernels without a copy: the
    output comes in (B, T, H, dv) memory (merging heads is a view), the gradients in the inputs' layouts, all
    bit for bit the contiguous call's. A layout the kernels cannot take (a slice of a wider last dim) is copied."""
    q, k, v, kpm = inputs(2, 3, 13, 13, seed=19, pad=True)
    dout = torch.randn(2, 3, 13, 16, generator=torch.Generator().manual_seed(20))

    def run(q, k, v, dout):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = function.topk_attention_triton(q, k, v, 4, True, key_padding_mask=kpm)
        out.backward(dout)
        return out, q.grad, k.grad, v.grad

    ref = run(q, k, v, dout)
    split = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, dout)]
    copies, real_contiguous = [], torch.Tensor.contiguous

    def contiguous(t, *args, **kwargs):  # records the calls that copy
        if not t.is_contiguous():
            copies.append(t.shape)
        return real_contiguous(t, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "contiguous", contiguous)
        got = run(*split)
    assert copies == [], copies
    assert got[0].transpose(1, 2).is_contiguous()
    for g, r, x in zip(got, ref, [None, *split[:3]]):
        assert torch.equal(g, r)
        assert x is None or g.stride() == x.stride()
    wide = [torch.cat([t, t], -1)[..., :16] for t in (q, k, v)]  # stride(-1) == 1 but not dense: copied
    for g, r in zip(run(*wide, dout), ref):
        assert torch.equal(g, r)


def test_small_shared_memory_takes_the_sparse_kernels(monkeypatch):
    """A GPU with less shared memory per block than the threshold kernels ask for (THRESHOLD_SMEM; their tiles are
    not fitted) gets the sparse kernels, whose tiles are; the result is the same function."""
    monkeypatch.setattr(function, "smem_limit", lambda device: function.THRESHOLD_SMEM - 1)
    launches = record_launches(monkeypatch)
    q, k, v, _ = inputs(1, 1, 21, 21, seed=18)
    check(q, k, v, 4, True)
    names = {s[1] for s in launches}
    assert "_select_kernel" not in names and "_bwd_kernel" in names, names
