"""Top-k attention by per-row thresholds: masked flash-attention-style sweeps on the tensor cores (Triton).

The top-k set of a row is {j : (s_ij, -j) > (t_i, -tj_i)} for a threshold t_i (and, only when the k-th and
(k+1)-th scores tie, a key index tj_i that splits the tied keys). Once t is known, the forward is flash attention
with that mask, the row max already known, and the backward is flash attention's backward with the same mask:
tensor-core tiles throughout, O(T) memory (t, tj and the log-sum-exp per row; k key indices per row for the sparse
backward at long T), deterministic up to CONFIG["sparse_bwd_T"] rows (no atomics unless CONFIG["atomic_dq"]).

Finding t, per tile of BM query rows, in sweeps over the key tiles (s = raw dot q . k; scale > 0 keeps the order):

A. Per group (key j is in group j mod BN_A) the keep_A (CONFIG, 2) largest scores and the row max. A bisection on
   the kept scores' order-preserving int32 bits, inside [the smallest group max, the row max], finds L with
   k .. k + slack of the keep_A * BN_A kept scores >= L: a lower bound of the row's k-th largest, as they are
   distinct scores. A score above L is missed only if its group holds more than keep_A of the row's top k; with
   128 groups, keep_A = 2 and k = 64 that is ~2 scores per random row, for R to pop (64 groups keeping 4: ~0.3,
   but 7 compares per score instead of 3; NOTES.md, sessions 10 and 14).
R. Count c = #{s > lo} (lo = the float just below L) and keep the 3 smallest scores > lo of every one of BN
   groups. With e = c - k, popping the merged lists in order gives u_1 <= u_2 <= ... (the smallest scores > lo),
   exact up to the smallest 3rd entry of a full list (the scores no list holds lie above it). e = 0 -> t between
   lo and u_1; 1 <= e < pops and u_(e+1) exact -> t between u_e and u_(e+1); otherwise lo rises to the last exact
   u_j (j <= e) and R repeats (4-6% of the 64-row tiles of random inputs at the defaults, T = 4096 / 8192; 0.3-0.8%
   with 64 groups keeping 4 in A).
   t lies strictly inside the gap (halfway between u_e and u_(e+1), or between lo and u_1), and the kernels that
   compare scores with it recompute them with the same bits (see below).
T. Only when the boundary is a tie (two keys with the k-th score): t = that score and tj is found by bisection on
   the key index: #{s > t} + #{s == t, j < tj} = k. Ties break towards the smaller key index.
F. The masked forward: p = exp(scale (s - max)) where selected, out = p v / sum p.

The backward is flash attention's with the same mask (dense, deterministic) up to CONFIG["sparse_bwd_T"] query
rows; from there it is chunk.py's sparse O(T k) one, which gathers each row's k keys: F then also lists, per row,
the key tiles where it selects any key with the tile's selection as a bit mask (the 0/1 selection tile times powers
of two, on the tensor cores), and _decode_kernel turns the lists into key indices.

Kernels: _select_kernel (A, R, T; BM_sel rows, register-heavy), _fwd_kernel (F), _decode_kernel, _bwd_dq_kernel,
_bwd_dkdv_kernel (BM rows; with CONFIG["atomic_dq"] the dk/dv kernel also adds dq with float32 atomics and
_delta_kernel replaces the dq kernel). All compute a score with the same code (_scores: one tensor-core dot over
the head dim, in the same order), so they see the same bits whatever the tile shape; on an H200 the tie check
(169 tie rows, selection BM_sel = 64 against BM = 128 elsewhere) confirmed it for the row tiles, and
bench/check_topk_gpu.py's score_bits compares sweep A's row max, bit for bit, across key tiles 128 / 64 / 32, row
tiles 64 / 128 and 4 / 8 warps.
Measured costs: kernels/topk_attn/NOTES.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fit import reg_cap
from .chunk import LOG2E, NEG, _key_tile, _pow2, _row_tile, _scores, _store_where, _tile_scores

# BM_sel query rows (sel_warps) per selection tile, BM rows (warps; bwd_warps) per forward / dq tile, BN_A / BN keys per
# tile of sweep A / R and T (= their numbers of groups; keep_A * BN_A >= k, or the bound is -inf and R counts all;
# keep_A: the scores each group keeps in sweep A, 2, 3 or 4), BN_fwd / BN_dq keys per forward / dq tile (fwd_maxnreg /
# dq_maxnreg: their register caps for 2-byte inputs, fit.reg_cap: 64-key tiles fit 128, two CTAs per SM; not the forward
# that also finds indices, which spills there); the dk/dv kernel: BN_kv keys per program, BM_kv query rows per step of
# its sweep over the query tiles that see them, at kv_warps warps (a score's bits do not depend on the tile shape, see
# the module docstring). SEL_BITS: at most that many bisection steps for L (fewer: a lower L, more for R to remove); a
# row's bisection stops at <= k + slack kept scores >= L; R pops at most `pops` scores per sweep. atomic_dq: the dk/dv
# kernel adds dq with float32 atomics instead of a dq kernel (not under torch.use_deterministic_algorithms).
# sparse_bwd_T: from that many query rows the forward also finds each row's key indices and the sparse O(T k) backward
# (chunk.py) runs instead of the dense masked one (function.takes_sparse_bwd): the forward then takes BN_idx keys per
# tile (fewer list entries per row), and BR_dec rows per program decode them; the lists of a launch take at most
# list_bytes (the forward then runs over groups of heads, each decoded before the next). stages: pipeline stages of the
# selection and forward kernels, bwd_stages of the backward ones (float32 inputs: at most 2, _stages). Tuned on an H200
# (NOTES.md).
CONFIG = {"BM_sel": 64, "sel_warps": 4, "BM": 128, "BN_A": 128, "BN": 64, "warps": 8, "stages": 3, "bwd_warps": 8,
          "bwd_stages": 3, "BN_fwd": 64, "fwd_maxnreg": 128, "BN_dq": 64, "dq_maxnreg": 128, "BM_kv": 64, "BN_kv": 64,
          "kv_warps": 4, "SEL_BITS": 32, "slack": 1, "pops": 16, "keep_A": 2, "atomic_dq": False, "sparse_bwd_T": 16384,
          "BN_idx": 128, "BR_dec": 16, "list_bytes": 1 << 30}
POS = tl.constexpr(float("inf"))
KEY_NEG_INF = tl.constexpr(-2139095041)  # _key(-inf)


@triton.jit
def _key(x):
    """float32 -> int32 in the same (signed) order."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey(o):
    return (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _mid(a, b):
    """A float in [a, b) (a < b): the midpoint unless rounding puts it on b."""
    m = a * 0.5 + b * 0.5
    return tl.where((m >= a) & (m < b), m, a)


@triton.jit
def _order(a, x, LARGEST: tl.constexpr):
    """(the one of a, x to keep, the one to pass on): the larger first when LARGEST, else the smaller."""
    if LARGEST:
        return tl.maximum(a, x), tl.minimum(a, x)
    else:
        return tl.minimum(a, x), tl.maximum(a, x)


@triton.jit
def _keep(a1, a2, a3, a4, x, LARGEST: tl.constexpr, N: tl.constexpr):
    """Elementwise insertion of x into the sorted lists a1 .. aN (N = 2, 3 or 4; the lists past N are passed
    through): the N largest (LARGEST) or smallest so far."""
    a1, x = _order(a1, x, LARGEST)
    if N == 2:
        a2, _ = _order(a2, x, LARGEST)
    else:
        a2, x = _order(a2, x, LARGEST)
        if N == 4:
            a3, x = _order(a3, x, LARGEST)
            a4, _ = _order(a4, x, LARGEST)
        else:
            a3, _ = _order(a3, x, LARGEST)
    return a1, a2, a3, a4


@triton.jit
def _bisect_step(g1, g2, g3, g4, a, z, c, act, KK, SLACK: tl.constexpr, KEEP: tl.constexpr):
    """One bisection step at the key c: count the kept scores >= _unkey(c) (float compares that give 1.0 / 0.0,
    summed in float32: half the instructions of int32 compares and selects); the rows that stop (KK .. KK + SLACK
    of them, or a bracket of one key) leave act."""
    cf = _unkey(c.to(tl.int32))[:, None]
    n = tl.where(g1 >= cf, 1.0, 0.0) + tl.where(g2 >= cf, 1.0, 0.0)
    if KEEP >= 3:
        n += tl.where(g3 >= cf, 1.0, 0.0)
    if KEEP == 4:
        n += tl.where(g4 >= cf, 1.0, 0.0)
    n = tl.sum(n, 1)
    up = n >= KK
    a = tl.where(act & up, c, a)
    z = tl.where(act & ~up, c, z)
    act = act & ~(up & (n <= KK + SLACK)) & (z - a > 1)
    return a, z, (a + z) >> 1, act  # a < c < z while z - a >= 2


@triton.jit
def _pop_min(b1, b2, b3, cols):
    """Smallest entry u of the per-group sorted lists (b1 <= b2 <= b3), and the lists with u removed."""
    u = tl.min(b1, 1)
    at = tl.min(tl.where(b1 == u[:, None], cols[None, :], 1 << 30), 1)
    hit = cols[None, :] == at[:, None]
    return u, tl.where(hit, b2, b1), tl.where(hit, b3, b2), tl.where(hit, POS, b3)


@triton.jit
def _count_pass(q, K, KPM, rows, m0, n_end, off, S, DK, skt, lo,
                BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Sweep R: #{s > lo} of every row and the 3 smallest {s > lo} of every group (POS where fewer). The count is
    kept per group and summed once at the end: no row reduction per key tile."""
    cnt = tl.zeros([BM, BN], dtype=tl.float32)
    b1 = tl.full([BM, BN], POS, tl.float32)
    b2 = tl.full([BM, BN], POS, tl.float32)
    b3 = tl.full([BM, BN], POS, tl.float32)
    for n0 in range(0, n_end, BN):
        s = _scores(q, K, KPM, rows, n0, m0, off, S, DK, skt, BN, DP, CAUSAL, HAS_PAD, PREC, UPCAST)
        up = s > lo[:, None]
        cnt += tl.where(up, 1.0, 0.0)
        b1, b2, b3, _ = _keep(b1, b2, b3, b3, tl.where(up, s, POS), False, 3)
    return tl.sum(cnt, 1).to(tl.int32), b1, b2, b3


@triton.jit
def _tie_pass(q, K, KPM, rows, m0, n_end, off, S, DK, skt, ts, x,
              BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Sweep T: #{s > ts} and #{s == ts, j < x} of every row."""
    gt = tl.zeros([BM], dtype=tl.int32)
    eq = tl.zeros([BM], dtype=tl.int32)
    for n0 in range(0, n_end, BN):
        s = _scores(q, K, KPM, rows, n0, m0, off, S, DK, skt, BN, DP, CAUSAL, HAS_PAD, PREC, UPCAST)
        cols = n0 + tl.arange(0, BN)
        gt += tl.sum((s > ts[:, None]).to(tl.int32), 1)
        eq += tl.sum(((s == ts[:, None]) & (cols[None, :] < x[:, None])).to(tl.int32), 1)
    return gt, eq


@triton.jit
def _tile_ids(NM, BM: tl.constexpr, H, BH0=0):
    """This program's (batch * head, batch, head, first query row); the longest (causal) rows first. BH0: the
    first (batch * head) of a launch over some of them."""
    bh = BH0 + tl.program_id(1)
    return bh, bh // H, bh % H, (NM - 1 - tl.program_id(0)) * BM


@triton.jit
def _below(t):
    """The largest float32 below t, so that s > _below(t) <=> s >= t (-0.0 == +0.0: below both is the negative
    denormal; below -inf is -inf)."""
    b = _unkey(_key(t) - 1)
    b = tl.where(b == t, _unkey(_key(t) - 2), b)
    return tl.where(t == NEG, t, b)


@triton.jit
def _cut(cols, t, tj, TIE: tl.constexpr = True):
    """Per (row, key) the value a score must exceed to be selected: (s, -j) > (t, -tj) <=> s > t, or s == t for
    a key below tj (a tie row), i.e. s > the float below t. A float tensor, no boolean one: a mask that a runtime
    branch chooses is kept as bits Triton packs and unpacks per element (2.5x the forward's instructions).
    TIE False: for key tiles no row's split reaches (_tie_end), t alone (two instructions fewer per score)."""
    if TIE:
        return tl.where(cols[None, :] < tj[:, None], _below(t)[:, None], t[:, None])
    else:
        return t[:, None]


@triton.jit
def _tie_end(tj, n_end, BN: tl.constexpr):
    """Where the key tiles of a program with fixed rows stop needing the tie split: the keys below a tie row's tj
    lie in the tiles before it. Without a tie row (tj = 0 on every row; nearly every program) that is key 0."""
    return tl.minimum(tl.cdiv(tl.max(tj, 0), BN) * BN, n_end)


@triton.jit
def _select_kernel(Q, K, KPM, MX, TT, TJ, STATS, T, S, H, DK, off, KK, NM,
                   sqb, sqh, sqt, skb, skh, skt, smb,
                   BM: tl.constexpr, BNA: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_PAD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, SEL_BITS: tl.constexpr,
                   SLACK: tl.constexpr, POPS: tl.constexpr, KEEP_A: tl.constexpr, WITH_STATS: tl.constexpr,
                   STOP: tl.constexpr):
    """One tile of BM query rows: sweeps A, R (T). Stores the raw row max (MX) and the threshold (TT, TJ) per row;
    WITH_STATS: also the tile's bisection steps, R sweeps and T sweeps (STATS, 3 int32 per tile).
    STOP != 0 only for the timing breakdown and checks (bench/check_topk_gpu.py): stop after A (1), the bisection
    (2)."""
    bh, b, h, m0 = _tile_ids(NM, BM, H)
    rows, rmask, q, Kb, KPMb, n_end = _row_tile(Q, K, KPM, b, h, m0, T, S, DK, off, sqb, sqh, sqt, skb, skh, smb,
                                                BM, DP, CAUSAL, UPCAST)

    # A. the KEEP_A largest scores of every group
    g1 = tl.full([BM, BNA], NEG, tl.float32)
    g2 = tl.full([BM, BNA], NEG, tl.float32)
    g3 = tl.full([BM, BNA], NEG, tl.float32)
    g4 = tl.full([BM, BNA], NEG, tl.float32)
    for n0 in range(0, n_end, BNA):
        s = _scores(q, Kb, KPMb, rows, n0, m0, off, S, DK, skt, BNA, DP, CAUSAL, HAS_PAD, PREC, UPCAST)
        g1, g2, g3, g4 = _keep(g1, g2, g3, g4, s, True, KEEP_A)
    r = bh.to(tl.int64) * T + rows
    mx = tl.max(g1, 1)
    tl.store(MX + r, mx, mask=rmask)
    if STOP == 1:  # TT: the raw row max (the GPU check compares its bits across tile shapes)
        tl.store(TT + r, mx, mask=rmask)
        return
    # L: a lower bound of the KK-th largest kept score, by bisection on the keys in [a, z): at least KK kept scores
    # reach a, none reaches z. Start: a = the smallest group max when KK groups have one (else the smallest kept
    # score), z just above the row max. A row stops once at most KK + SLACK kept scores reach a (R removes the
    # extra ones), the tile when every row has stopped.
    f1 = g1 > NEG
    n1 = tl.sum(f1.to(tl.int32), 1)
    nk = n1 + tl.sum((g2 > NEG).to(tl.int32), 1)
    least = tl.where(g2 > NEG, g2, tl.where(f1, g1, POS))  # smallest kept, per group
    if KEEP_A >= 3:
        nk += tl.sum((g3 > NEG).to(tl.int32), 1)
        least = tl.where(g3 > NEG, g3, least)
    if KEEP_A == 4:
        nk += tl.sum((g4 > NEG).to(tl.int32), 1)
        least = tl.where(g4 > NEG, g4, least)
    a0 = tl.where(n1 >= KK, tl.min(tl.where(f1, g1, POS), 1), tl.min(least, 1))
    bound = rmask & (nk >= KK)  # else no bound: R counts every visible score
    a = _key(tl.where(bound, a0, 0.0)).to(tl.int64)
    z = _key(tl.where(bound, mx, 0.0)).to(tl.int64) + 1
    c = a
    act = bound
    steps = 0
    go = tl.max(act.to(tl.int32), 0) > 0
    while go:  # the first step counts at a itself: it may already be the answer (short rows, all kept)
        a, z, c, act = _bisect_step(g1, g2, g3, g4, a, z, c, act, KK, SLACK, KEEP_A)
        steps += 1
        go = (steps < SEL_BITS) & (tl.max(act.to(tl.int32), 0) > 0)
    lo = tl.where(bound, _below(_unkey(a.to(tl.int32))), NEG)  # s > lo <=> s >= L
    if STOP == 2:
        tl.store(TT + r, lo, mask=rmask)
        return

    # R. count above lo until every row has its threshold (state 0: counting, 1: done, 2: tie at t)
    state = tl.where(rmask, 0, 1)
    t = tl.full([BM], NEG, tl.float32)
    cols = tl.arange(0, BN)
    sweeps = 0
    while tl.max(tl.where(state == 0, 1, 0), 0) > 0:
        cnt, b1, b2, b3 = _count_pass(q, Kb, KPMb, rows, m0, n_end, off, S, DK, skt, lo,
                                      BM, BN, DP, CAUSAL, HAS_PAD, PREC, UPCAST)
        sweeps += 1
        act = state == 0
        e = cnt - KK
        # pop u_1 .. u_(e+1) (at most POPS): ue = u_e (lo for e = 0), ue1 = u_(e+1) and whether it is exact;
        # lift = the last exact u_j with j <= e, where lo goes when e is out of reach. A popped u is the true
        # j-th smallest score > lo when u <= full: the scores no list holds are >= the 3rd of a full list.
        full = tl.min(b3, 1)  # POS where no list is full
        ue = lo
        ue1 = tl.full([BM], POS, tl.float32)
        exact1 = rmask & False
        lift = lo
        npop = tl.max(tl.where(act & (e >= 0), tl.minimum(e + 1, POPS), 0), 0)
        j = 1
        while j <= npop:
            u, b1, b2, b3 = _pop_min(b1, b2, b3, cols)
            ue = tl.where(e == j, u, ue)
            ue1 = tl.where(e + 1 == j, u, ue1)
            exact1 = tl.where(e + 1 == j, u <= full, exact1)
            lift = tl.where((u <= full) & (j <= e), u, lift)
            j += 1
        sep = exact1 & (ue < ue1)
        t = tl.where(sep, _mid(ue, ue1), t)
        # a tie at the boundary: u_e = u_(e+1), or (e < 0, lo above -inf: lo came from a lift) the k-th score is lo
        tie = (exact1 & (ue == ue1)) | (act & (e < 0) & (lo > NEG))
        t = tl.where(tie, tl.where(e < 0, lo, ue), t)
        every = act & (e < 0) & (lo == NEG)  # fewer than k visible keys: t = -inf takes them all
        state = tl.where(sep | every, 1, tl.where(tie, 2, state))
        lo = tl.where(act & (e > 0) & ~exact1, lift, lo)

    # T. ties at the boundary: the key index tj that lets exactly k through, by bisection on [0, S]
    tie = state == 2
    xlo = tl.zeros([BM], dtype=tl.int32)
    xhi = tl.where(tie, S, 0)
    tsweeps = 0
    while tl.max(xhi - xlo, 0) > 1:
        tsweeps += 1
        mid = (xlo + xhi) // 2
        gt, eq = _tie_pass(q, Kb, KPMb, rows, m0, n_end, off, S, DK, skt, t, mid,
                           BM, BN, DP, CAUSAL, HAS_PAD, PREC, UPCAST)
        busy = xhi - xlo > 1
        up = gt + eq >= KK
        xhi = tl.where(busy & up, mid, xhi)
        xlo = tl.where(busy & ~up, mid, xlo)
    tl.store(TT + r, t, mask=rmask)
    tl.store(TJ + r, tl.where(tie, xhi, 0), mask=rmask)
    if WITH_STATS:
        st = STATS + (bh * NM + tl.program_id(0)) * 3
        tl.store(st, steps)
        tl.store(st + 1, sweeps)
        tl.store(st + 2, tsweeps)


@triton.jit
def _fwd_kernel(Q, K, V, KPM, MX, TT, TJ, O, LSE, E, NE, T, S, H, DK, DV, off, qk2, NM, BH0,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, smb,
                BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_PAD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, KK: tl.constexpr,
                MASKS: tl.constexpr, FAST: tl.constexpr):
    """Sweep F, the masked forward: out = sum p v / sum p with p = exp(scale (s - max)) where selected. The row max
    is selected (k >= 1), so p <= 1 (to rounding) and sum p >= 1 on a non-empty row. Stores out and the base-2
    log-sum-exp of the selected scaled scores (LSE; qk2 = scale * log2(e)).
    MASKS: also each row's selection as a list of (first key of a tile, its selected keys as a bit mask in words of
    24 bits) for the key tiles where it selects any, at most KK, and their number, for the grid's (batch * head)s
    from BH0 on (E: (G * T, KK, 1 + NW) int32, NE: (G * T,), G the grid's second axis; threshold_fwd bounds
    their memory so); _decode_kernel turns them into key indices for the sparse backward. The masks come off the
    tensor cores: the 0/1 selection tile times W (W[j, w] = 2^(j - 24 w) for the keys j of word w) sums
    distinct powers of two, exact in float32, on bfloat16 tiles; a row's entry is stored by inline PTX in the dot's
    register layout (_store_where): FAST, the GPU's path (as chunk.py's). Otherwise (the interpreter) float32
    tiles, as its bfloat16 dot is not exact, and tl.store. Per-score stores instead (a slot per selected score,
    from a prefix count or an atomic count) doubled the loop's instructions or its time (NOTES.md, session 12)."""
    bh, b, h, m0 = _tile_ids(NM, BM, H, BH0)
    rows, rmask, q, Kb, KPMb, n_end = _row_tile(Q, K, KPM, b, h, m0, T, S, DK, off, sqb, sqh, sqt, skb, skh, smb,
                                                BM, DP, CAUSAL, UPCAST)
    dv = tl.arange(0, DVP)
    Vb = V + b.to(tl.int64) * svb + h * svh
    r = bh.to(tl.int64) * T + rows
    re = tl.program_id(1).to(tl.int64) * T + rows  # the row in this launch's lists
    mx = tl.load(MX + r, mask=rmask, other=0.0)
    t = tl.load(TT + r, mask=rmask, other=POS)
    tj = tl.load(TJ + r, mask=rmask, other=0)
    mq = mx * qk2
    acc = tl.zeros([BM, DVP], dtype=tl.float32)
    den = tl.zeros([BM], dtype=tl.float32)
    ne = tl.zeros([BM], dtype=tl.int32)
    NW: tl.constexpr = (BN + 23) // 24
    tl.static_assert(NW < 16, "BN: at most 15 mask words (and a column for the tile's first key) per entry")
    cw = tl.arange(0, 16)
    jw = tl.arange(0, BN)[:, None] - 24 * cw[None, :]
    W = tl.where((jw >= 0) & (jw < 24), (1 << tl.minimum(tl.maximum(jw, 0), 23)).to(tl.float32), 0.0)
    if FAST:
        W = W.to(tl.bfloat16)
    n_tie = _tie_end(tj, n_end, BN)
    for tie in tl.static_range(2):  # two loops, in key order: the tiles before n_tie with the tie split, the rest
        for n0 in range(0 if tie == 0 else n_tie, n_tie if tie == 0 else n_end, BN):
            s = _scores(q, Kb, KPMb, rows, n0, m0, off, S, DK, skt, BN, DP, CAUSAL, HAS_PAD, PREC, UPCAST)
            cols = n0 + tl.arange(0, BN)
            sel = s > _cut(cols, t, tj, tie == 0)
            p = tl.where(sel, tl.exp2(s * qk2 - mq[:, None]), 0.0)
            den += tl.sum(p, 1)
            v = tl.load(Vb + cols[:, None] * svt + dv[None, :], mask=(cols[:, None] < S) & (dv[None, :] < DV),
                        other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
            if MASKS:
                c = tl.where(sel, 1.0, 0.0)
                if FAST:
                    c = c.to(tl.bfloat16)
                w = tl.dot(c, W, input_precision="ieee").to(tl.int32)
                hit = (tl.max(w, 1) > 0) & rmask
                # the entry (n0, words): word i from column i of w, n0 from column NW (a column of zeros)
                col = cw[None, :] + 0 * w
                ptr = (E + (re * KK + ne) * (1 + NW))[:, None] + tl.where(col < NW, 1 + col, 0)
                val = tl.where(col < NW, w, n0)
                st = (hit & (ne < KK))[:, None] & (col <= NW)
                if FAST:
                    _store_where(ptr, val, st)
                else:
                    tl.store(ptr, val, mask=st)
                ne += hit.to(tl.int32)
    live = den > 0
    out = acc / tl.where(live, den, 1.0)[:, None]
    tl.store(O + b.to(tl.int64) * sob + h * soh + rows[:, None] * sot + dv[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & (dv[None, :] < DV))
    tl.store(LSE + r, tl.where(live, mq + tl.log2(tl.where(live, den, 1.0)), 0.0), mask=rmask)
    if MASKS:
        tl.store(NE + re, tl.minimum(ne, KK), mask=rmask)


@triton.jit
def _popcount(x):
    """Set bits of each int32 x < 2^24 (SWAR)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    return (((x + (x >> 4)) & 0x0F0F0F0F) * 0x01010101) >> 24


@triton.jit
def _decode_kernel(E, NE, I, BH, T, KK: tl.constexpr, KP: tl.constexpr, NW: tl.constexpr, BR: tl.constexpr,
                   FAST: tl.constexpr):
    """The key indices of BR rows' selections from _fwd_kernel's (tile, mask words) lists of BH heads: I (BH * T,
    KK) int32, the keys of a row in no particular order, -1 in the slots a row with fewer than KK keys leaves. Each
    list entry's keys go to the slots after the popcounts of the entries before it; then each mask word gives up
    its lowest set bit per step, in as many steps as the most bits a word of the tile holds (about 1 to 5 at
    T = 16384, where a row selects 64 of ~8k keys: walking all 24 bits took 4 times longer)."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rm = r < BH * T
    ce = tl.arange(0, KP)
    ne = tl.load(NE + r, mask=rm, other=0)
    em = rm[:, None] & (ce[None, :] < ne[:, None])
    e = E + (r[:, None] * KK + ce[None, :]) * (1 + NW)
    n0 = tl.load(e, mask=em, other=0)
    cnt = tl.zeros([BR, KP], dtype=tl.int32)
    for w in tl.static_range(NW):
        cnt += _popcount(tl.load(e + 1 + w, mask=em, other=0))
    slot = tl.cumsum(cnt, 1) - cnt
    out = I + r[:, None] * KK
    for w in tl.static_range(NW):
        x = tl.load(e + 1 + w, mask=em, other=0)
        for _ in range(tl.max(tl.max(_popcount(x), 1), 0)):
            low = x & -x
            on = (low != 0) & (slot < KK)
            # the bit's index: the exponent of low (a power of two < 2^24) as a float32
            j = n0 + 24 * w + ((low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127)
            if FAST:
                _store_where(out + slot, j, on)
            else:
                tl.store(out + slot, j, mask=on)
            slot += (low != 0).to(tl.int32)
            x = x ^ low
    total = tl.sum(cnt, 1)
    tl.store(out + ce[None, :], tl.full([BR, KP], -1, tl.int32), mask=rm[:, None] & (ce[None, :] >= total[:, None])
             & (ce[None, :] < KK))


@triton.jit
def _row_vals(bh, T, rows, LSE, TT, TJ):
    """What the backward needs of query rows `rows`: t, tj and the log-sum-exp (padding rows: t = +inf, nothing
    selected), and the rows' offset and mask in (B * H, T) arrays."""
    r = bh.to(tl.int64) * T + rows
    rm = rows < T
    t = tl.load(TT + r, mask=rm, other=POS)
    return t, tl.load(TJ + r, mask=rm, other=0), tl.load(LSE + r, mask=rm, other=0.0), r, rm


@triton.jit
def _probs(s, cols, t, tj, lse, qk2, TIE: tl.constexpr = True):
    """exp2(s * qk2 - lse) where selected, else 0 (TIE as in _cut). The dk/dv kernel always splits: its rows change
    per step, and a branch per step on whether they hold a tie row was slower (sessions 9 and 17, NOTES.md)."""
    return tl.where(s > _cut(cols, t, tj, TIE), tl.exp2(s * qk2 - lse[:, None]), 0.0)


@triton.jit
def _bwd_dq_kernel(Q, K, V, KPM, O, DO, LSE, TT, TJ, DELTA, DQ, T, S, H, DK, DV, off, scale, qk2, NM,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdb, sdh, sdt, smb,
                   BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_PAD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ of BM query rows over their keys; also stores delta = rowsum(dO * O) for the dK/dV kernel."""
    bh, b, h, m0 = _tile_ids(NM, BM, H)
    rows, rmask, q, Kb, KPMb, n_end = _row_tile(Q, K, KPM, b, h, m0, T, S, DK, off, sqb, sqh, sqt, skb, skh, smb,
                                                BM, DP, CAUSAL, UPCAST)
    cd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    mv = rmask[:, None] & (dv[None, :] < DV)
    do = tl.load(DO + b.to(tl.int64) * sdb + h * sdh + rows[:, None] * sdt + dv[None, :], mask=mv, other=0.0)
    o = tl.load(O + b.to(tl.int64) * sob + h * soh + rows[:, None] * sot + dv[None, :], mask=mv, other=0.0)
    if UPCAST:
        do = do.to(tl.float32)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, delta, mask=rmask)
    Vb = V + b.to(tl.int64) * svb + h * svh
    dq = tl.zeros([BM, DP], dtype=tl.float32)
    t, tj, lse, _, _ = _row_vals(bh, T, rows, LSE, TT, TJ)
    n_tie = _tie_end(tj, n_end, BN)
    for tie in tl.static_range(2):  # as in _fwd_kernel
        for n0 in range(0 if tie == 0 else n_tie, n_tie if tie == 0 else n_end, BN):
            k = _key_tile(Kb, n0, S, DK, skt, BN, DP, UPCAST)
            s = _tile_scores(q, k, KPMb, rows, n0, m0, off, S, BN, CAUSAL, HAS_PAD, PREC)
            cols = n0 + tl.arange(0, BN)
            p = _probs(s, cols, t, tj, lse, qk2, tie == 0)
            vt = tl.load(Vb + cols[None, :] * svt + dv[:, None], mask=(cols[None, :] < S) & (dv[:, None] < DV),
                         other=0.0)
            if UPCAST:
                vt = vt.to(tl.float32)
            ds = p * (tl.dot(do, vt, input_precision=PREC) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqt + cd[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=rmask[:, None] & (cd[None, :] < DK))


@triton.jit
def _delta_kernel(O, DO, DELTA, T, H, DV, sob, soh, sot, sdb, sdh, sdt, BM: tl.constexpr, DVP: tl.constexpr):
    """delta = rowsum(dO * O) of BM rows (the atomic backward's dK/dV kernel reads it; the dq kernel makes its own)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    dv = tl.arange(0, DVP)
    m = (rows[:, None] < T) & (dv[None, :] < DV)
    do = tl.load(DO + b.to(tl.int64) * sdb + h * sdh + rows[:, None] * sdt + dv[None, :], mask=m, other=0.0)
    o = tl.load(O + b.to(tl.int64) * sob + h * soh + rows[:, None] * sot + dv[None, :], mask=m, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=rows < T)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, KPM, DO, LSE, TT, TJ, DELTA, DK_, DV_, DQ32, T, S, H, DK, DV, off, scale, qk2,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, smb,
                     BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_PAD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dK, dV of BN keys over the query tiles that can see them. The score tile is computed exactly as in the
    forward (q tile times the transposed key tile, _tile_scores), so the selection matches bit for bit; the key
    tile is loaded once. ATOMIC_DQ: also add each query tile's share of dQ (ds k, scaled) to DQ32 (float32,
    (B * H, T, DK), zeroed), so no dq kernel recomputes the scores; the order of the float32 adds varies."""
    bh = tl.program_id(1)
    n0 = tl.program_id(0) * BN
    b = bh // H
    h = bh % H
    cols = n0 + tl.arange(0, BN)
    cd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    Kb = K + b.to(tl.int64) * skb + h * skh
    Vb = V + b.to(tl.int64) * svb + h * svh
    KPMb = KPM + b.to(tl.int64) * smb
    k = _key_tile(Kb, n0, S, DK, skt, BN, DP, UPCAST)
    vt = tl.load(Vb + cols[None, :] * svt + dv[:, None], mask=(cols[None, :] < S) & (dv[:, None] < DV), other=0.0)
    if UPCAST:
        vt = vt.to(tl.float32)
    dk = tl.zeros([BN, DP], dtype=tl.float32)
    dvacc = tl.zeros([BN, DVP], dtype=tl.float32)
    m_start = 0
    if CAUSAL:
        m_start = (tl.maximum(n0 - off, 0) // BM) * BM
    # m_start < T always (n0 < S); the max() lets LLVM see the loop runs at least once: the path that skips it
    # set the accumulators between a dot's start and its wait, and ptxas then serialized every dot (C7515)
    t, tj, lse, r, rm = _row_vals(bh, T, m_start + tl.arange(0, BM), LSE, TT, TJ)
    delta = tl.load(DELTA + r, mask=rm, other=0.0)
    for i in range(0, tl.maximum(tl.cdiv(T - m_start, BM), 1)):
        m0 = m_start + i * BM
        rows, rmask, q, _, _, _ = _row_tile(Q, K, KPM, b, h, m0, T, S, DK, off, sqb, sqh, sqt, skb, skh, smb,
                                            BM, DP, CAUSAL, UPCAST)
        do = tl.load(DO + b.to(tl.int64) * sdb + h * sdh + rows[:, None] * sdt + dv[None, :],
                     mask=rmask[:, None] & (dv[None, :] < DV), other=0.0)
        if UPCAST:
            do = do.to(tl.float32)
        # the next step's row values now, a step ahead of their use: Triton pipelines only the loads that feed
        # dots, and these waited for memory right after the score dot
        t1, tj1, lse1, r1, rm1 = _row_vals(bh, T, rows + BM, LSE, TT, TJ)
        delta1 = tl.load(DELTA + r1, mask=rm1, other=0.0)
        s = _tile_scores(q, k, KPMb, rows, n0, m0, off, S, BN, CAUSAL, HAS_PAD, PREC)
        p = _probs(s, cols, t, tj, lse, qk2)
        dvacc += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        ds = p * (tl.dot(do, vt, input_precision=PREC) - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
        if ATOMIC_DQ:
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
            tl.atomic_add(DQ32 + (bh.to(tl.int64) * T + rows[:, None]) * DK + cd[None, :], dq,
                          mask=rmask[:, None] & (cd[None, :] < DK), sem="relaxed")
        t, tj, lse, delta = t1, tj1, lse1, delta1
    # dK, dV have the strides of K, V (threshold_bwd)
    tl.store(DK_ + b.to(tl.int64) * skb + h * skh + cols[:, None] * skt + cd[None, :],
             (dk * scale).to(DK_.dtype.element_ty), mask=(cols[:, None] < S) & (cd[None, :] < DK))
    tl.store(DV_ + b.to(tl.int64) * svb + h * svh + cols[:, None] * svt + dv[None, :],
             dvacc.to(DV_.dtype.element_ty), mask=(cols[:, None] < S) & (dv[None, :] < DV))


def heads_layout(t):
    """t (B, H, T, d) as the kernels take it: contiguous, or the model's split heads (a transposed view of a
    contiguous (B, T, H, d)), both read and written through strides with no copy; any other layout is copied."""
    return t if t.is_contiguous() or t.transpose(1, 2).is_contiguous() else t.contiguous()


def empty_out(q, DV):
    """The output (B, H, T, DV) in (B, T, H, DV) memory: the model merges heads with a view, not a copy."""
    B, H, T, _ = q.shape
    return q.new_empty(B, T, H, DV).transpose(1, 2)


def _stages(key, q):
    """CONFIG[key] pipeline stages, at most 2 for float32 inputs: their tiles take twice the bytes, and 3 stages ask
    for more shared memory than an H100 / H200 has (the dq kernel 262144 bytes, the dk/dv kernel 233472)."""
    return CONFIG[key] if q.element_size() <= 2 else min(CONFIG[key], 2)


def _common(q, k, key_padding_mask):
    kpm = (key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None
           else torch.empty(1, 1, dtype=torch.int8, device=q.device))
    # fp32 inputs: exact fp32 dots (tf32 would move the selection); the interpreter's bf16 dot is upcast
    upcast = q.dtype == torch.bfloat16 and not q.is_cuda
    prec = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    return kpm, upcast, prec


def threshold_fwd(q, k, v, topk, causal, key_padding_mask, scale, stats=None, indices=False):
    """q (B, H, T, d), k (B, H, S, d), v (B, H, S, dv), each in a heads_layout; 1 <= topk (= min(topk, S)).
    Returns out (B, H, T, dv) in q's dtype (empty_out's layout), per row (B, H, T) the base-2 log-sum-exp
    (float32) and the threshold (t float32, tj int32) the backward needs, and I (B, H, T, topk) int32: with
    `indices`, each row's selected keys for the sparse backward (chunk.topk_bwd; in no particular order, -1 in
    the slots of a row with fewer visible keys), else (B, H, 0, topk). stats: see selection_stats."""
    B, H, T, DK = q.shape
    S, DV = k.shape[2], v.shape[3]
    BM, BMS, BN = CONFIG["BM"], CONFIG["BM_sel"], CONFIG["BN_idx" if indices else "BN_fwd"]
    out = empty_out(q, DV)
    mx, lse, tt = (torch.empty(B, H, T, dtype=torch.float32, device=q.device) for _ in range(3))
    tj = torch.empty(B, H, T, dtype=torch.int32, device=q.device)
    I = torch.empty(B, H, T if indices else 0, topk, dtype=torch.int32, device=q.device)
    NW = triton.cdiv(BN, 24)
    # the forward's mask lists (see _fwd_kernel) of G (batch * head)s at a time, decoded into I after each launch:
    # at most CONFIG["list_bytes"] (all at once, B = 8, H = 16, T = 16384, k = 64: 3.7 GiB)
    G = max(1, min(B * H, CONFIG["list_bytes"] // (T * topk * (1 + NW) * 4))) if indices else B * H
    ent = torch.empty(G * T if indices else 0, topk, 1 + NW, dtype=torch.int32, device=q.device)
    ne = torch.empty(ent.shape[0], dtype=torch.int32, device=q.device)
    kpm, upcast, prec = _common(q, k, key_padding_mask)
    meta = dict(DP=_pow2(DK), CAUSAL=causal, HAS_PAD=key_padding_mask is not None, PREC=prec, UPCAST=upcast,
                num_stages=_stages("stages", q))
    stop = CONFIG.get("stop", 0)  # timing breakdown only (bench/check_topk_gpu.py)
    NS = triton.cdiv(T, BMS)
    _select_kernel[(NS, B * H)](
        q, k, kpm, mx, tt, tj, tj if stats is None else stats, T, S, H, DK, S - T, topk, NS, *q.stride()[:3],
        *k.stride()[:3], kpm.stride(0), BM=BMS, BNA=CONFIG["BN_A"], BN=CONFIG["BN"], SEL_BITS=CONFIG["SEL_BITS"],
        SLACK=CONFIG["slack"], POPS=CONFIG["pops"], KEEP_A=CONFIG["keep_A"], WITH_STATS=stats is not None, STOP=stop,
        num_warps=CONFIG["sel_warps"], **meta)
    if stop:
        return out, lse, tt, tj, I
    NM = triton.cdiv(T, BM)
    for bh0 in range(0, B * H, G):
        g = min(G, B * H - bh0)
        _fwd_kernel[(NM, g)](
            q, k, v, kpm, mx, tt, tj, out, lse, ent if indices else tj, ne if indices else tj, T, S, H, DK, DV,
            S - T, scale * LOG2E, NM, bh0, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            kpm.stride(0), BM=BM, BN=BN, DVP=_pow2(DV), KK=topk, MASKS=indices, FAST=q.is_cuda,
            num_warps=CONFIG["warps"], **meta, **({} if indices else reg_cap(CONFIG, "fwd", q)))
        if indices:
            BR = CONFIG["BR_dec"]
            _decode_kernel[(triton.cdiv(g * T, BR),)](ent, ne, I.view(B * H * T, topk)[bh0 * T:], g, T, KK=topk,
                                                       KP=_pow2(topk, 1), NW=NW, BR=BR, FAST=q.is_cuda)
    return out, lse, tt, tj, I


def selection_stats(q, k, v, topk, causal, key_padding_mask=None, scale=1.0):
    """What the selection of threshold_fwd did, per tile of BM_sel query rows: (B * H, tiles, 3) int32 of
    bisection steps, R sweeps and T sweeps (tiles in launch order: the last rows first)."""
    NS = triton.cdiv(q.shape[2], CONFIG["BM_sel"])
    stats = torch.zeros(q.shape[0] * q.shape[1], NS, 3, dtype=torch.int32, device=q.device)
    threshold_fwd(q, k, v, topk, causal, key_padding_mask, scale, stats)
    return stats


def threshold_bwd(q, k, v, out, dout, lse, tt, tj, causal, key_padding_mask, scale):
    """Gradients of threshold_fwd's output (dq, dk, dv in the inputs' dtypes and layouts)."""
    B, H, T, DK = q.shape
    S, DV = k.shape[2], v.shape[3]
    BM = CONFIG["BM"]
    NM = triton.cdiv(T, BM)
    dout = heads_layout(dout)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # written with q, k, v's strides
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    kpm, upcast, prec = _common(q, k, key_padding_mask)
    meta = dict(DP=_pow2(DK), DVP=_pow2(DV), CAUSAL=causal, HAS_PAD=key_padding_mask is not None,
                PREC=prec, UPCAST=upcast, num_warps=CONFIG["bwd_warps"], num_stages=_stages("bwd_stages", q))
    atomic = CONFIG["atomic_dq"] and not torch.are_deterministic_algorithms_enabled()
    if atomic:
        dq32 = torch.zeros(B * H, T, DK, dtype=torch.float32, device=q.device)
        _delta_kernel[(NM, B * H)](out, dout, delta, T, H, DV, *out.stride()[:3], *dout.stride()[:3], BM=BM,
                                   DVP=_pow2(DV))
    else:
        dq32 = delta  # not read
        _bwd_dq_kernel[(NM, B * H)](
            q, k, v, kpm, out, dout, lse, tt, tj, delta, dq, T, S, H, DK, DV, S - T, scale, scale * LOG2E, NM,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *dout.stride()[:3], kpm.stride(0),
            BM=BM, BN=CONFIG["BN_dq"], **meta, **reg_cap(CONFIG, "dq", q))
    BNK = CONFIG["BN_kv"]
    _bwd_dkdv_kernel[(triton.cdiv(S, BNK), B * H)](
        q, k, v, kpm, dout, lse, tt, tj, delta, dk, dv, dq32, T, S, H, DK, DV, S - T, scale, scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], kpm.stride(0),
        BM=CONFIG["BM_kv"], BN=BNK, ATOMIC_DQ=atomic, **{**meta, "num_warps": CONFIG["kv_warps"]})
    if atomic:
        dq.copy_(dq32.view(B, H, T, DK))
    return dq, dk, dv
