"""Chunked linear-attention kernels (Triton), shared by linear attention and MemSizer.

For one (batch, head) with features Q = phi(q), K = phi(k) (padded keys zeroed) and values V:

    num_t = sum_{j<=t} (Q_t . K_j) V_j        den_t = sum_{j<=t} Q_t . K_j        (all j when not causal)
    y_t   = r_t num_t                           r_t = 1 / (den_t + eps)   (NORM)   or a given row scale / 1

The denominator is the same sum with a column of ones as the value, so it rides along as a row sum of the score
tile plus Q_t . z with z = sum_j K_j: no extra pass. A program owns one (batch, head, dv-tile) and a contiguous
run of chunks of BT rows; inside a chunk the product is quadratic, across chunks it goes through the state
S = sum K_j V_j^T (d x BV) and z, carried in registers in float32. A program's run starts from a given state:
bidirectional, the total over all keys; causal, the prefix over the earlier runs (when the sequence is split
over several programs for parallelism; each split's own sum comes from _state_kernel). Backward, with
dnum = r dy and dden = -r (dy . y):

    dQ_t = sum_{j<=t} (dnum_t . V_j + dden_t) K_j     a forward scan with the same S, z
    dK_j = sum_{t>=j} (dnum_t . V_j + dden_t) Q_t     a reverse scan with R = sum Q_t dnum_t^T, w = sum dden_t Q_t
    dV_j = sum_{t>=j} (Q_t . K_j) dnum_t

(the query-side kernel also sums each run's R, w, from which the key-side runs get their starting suffix).

Two ways to give causal runs their start states. With enough (batch, head) pairs to fill the GPU, every chunk is
its own run (fully parallel kernels) and one serial pass per (batch, head, state tile) writes each chunk's prefix
state S, z (forward) and suffix state R, w (backward) as it goes (_prefix_kernel, the design of fla's chunk_fwd_h);
the backward then makes each chunk's dq, dk, dv in one kernel (_bwd_chunk_kernel). With few heads (long sequences
at a fixed token count) that pass would run on a handful of SMs, so there runs of chunks each sum their own state
(_state_kernel; the query-side backward kernel for R, w) and _scan_kernel adds up the runs before them.
Nothing of size T x T is stored; the backward recomputes features and scores, and saves only the run start
states of the forward (one d x dv tile per run and head; bf16 where the kernels round them to bf16 anyway).
dv is tiled (BV); dq/dk of several dv-tiles are float32 partials summed afterwards. Dot operands are bf16 for
bf16 inputs and float32 otherwise (tf32 for fp16, whose range is too small for the long-context state and for
dnum ~ 1/t; exact fp32 for fp32 inputs); accumulation is always float32.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from ..fit import MIN_BK, NoFit, _p2, chunk_smem, fit_chunk, is_oor, reg_cap, smem_limit

# Picked on an H100 by bench/check_kernels_gpu.py (numbers in kernels/NOTES.md). BV: the dv-tile, at least "BV"
# and up to "state" / BK (a narrow d, MemSizer's k slots, gets a wider tile, so fewer dq/dk partials). Causal runs:
# a sequence of at least "run_min_chunks" chunks is split into runs until about "programs" programs are in flight
# (10% faster for linear attention and 35% for MemSizer at T=16384; at T=1024 the extra launch and state pass cost
# more than they save), with "run_bwd_warps" warps in the backward. stages=1 crashed (illegal address) on Triton 3.6.
# "fill": a shorter causal sequence is split too when fewer (batch, head, dv-tile) programs than this would run, about
# one per SM: the model benchmark's T=4096 (32 heads in all, 64 chunks each) ran at 0.77x softmax under CUDA graphs
# with one serial program per head, where T=8192 (split) ran at 1.29x (bench/RESULTS.md, session 4).
# "one_chunk_runs": a split sequence of at most this many chunks gets one run per chunk: the kernels then carry no
# state (CARRY) and run fully parallel (linear attention 1.15 -> 1.08 ms, MemSizer 0.55 -> 0.46 ms fwd+bwd at
# B=8, H=16, T=4096; at 128 chunks and more the run-state traffic costs more than it saves; session 5 in NOTES.md).
# "serial_programs": a causal sequence takes one run per chunk and its chunk states from one serial pass per
# (batch, head, state tile) (_prefix_kernel) instead of per-run sums and a scan, where at least this many of those
# programs run; "serial_tile": their widest state tile (narrower tiles where that gives more programs). Picked on
# an H200 (session 7 in kernels/NOTES.md): at B=8, H=16, T=4096 linear attention fwd+bwd 1.06 -> 0.81 ms, MemSizer
# 0.45 -> 0.32; at B=1, H=8, T=16384 (32 programs) the scan path stays (serial there: 0.32 -> 0.92 ms).
# "serial_stages": that pass's load pipeline, fewer where they would not fit (4 against 3: both passes 0.139 ->
# 0.131 ms at B=8, H=16, T=4096 and 0.535 -> 0.503 at 16384, MemSizer 0.099 -> 0.095; session 16).
# "chunk_bwd_warps": the fused chunk backward (4: 0.31 ms at B=8, H=16, T=4096; 8 warps: 0.52). "fwd_maxnreg": the
# forward kernel's register cap for 2-byte inputs and state tiles of at most 4096 entries (linear attention's
# 64 x 64, MemSizer's 32 x 128; fit.reg_cap): three CTAs per SM instead of two (201 registers uncapped),
# linear 0.181 -> 0.145 ms at B=8, H=16, T=4096 (session 13). "chunk_bwd_maxnreg": the same for the fused chunk
# backward, bf16 only (float16's float32 tiles spill 632 bytes under it): 170 -> 168 registers, three CTAs per SM,
# 0.239 -> 0.212 ms on mapped features at B=8, H=16, T=4096 (session 15).
CONFIG = {"BT": 64, "BV": 64, "state": 4096, "fwd_warps": 4, "bwd_warps": 8, "stages": 2,
          "programs": 2112, "run_min_chunks": 32, "run_bwd_warps": 4, "fill": 128, "one_chunk_runs": 64,
          "serial_programs": 128, "serial_tile": 64, "serial_warps": 4, "serial_stages": 4, "chunk_bwd_warps": 4,
          "fwd_maxnreg": 160, "chunk_bwd_maxnreg": 168}
# kernels launched together share one dv-tile
GROUPS = {"fwd": ("state", "fwd"), "bwd": ("bwd_q", "bwd_kv", "bwd_chunk")}


@triton.jit
def _cast(x, LOWP: tl.constexpr):
    """Dot operand: bf16 (LOWP=1), float32 (0), or bf16-rounded float32 (2: the interpreter, whose dot on bf16
    multiplies the raw bits)."""
    if LOWP == 1:
        y = x.to(tl.bfloat16)
    elif LOWP == 2:
        y = x.to(tl.bfloat16).to(tl.float32)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _feat(x, m, ELU1: tl.constexpr):
    """phi(x) on a float32 tile, 0 where m is False (padded rows/columns must add nothing; elu1(0) = 1 would).
    ELU1: 1 maps x here; 0 and 2 take x as the features (2: they are elu + 1 of the inputs, feature.py), which every
    caller loaded as 0 under m: no select then, so the tile can feed a dot straight from the loads' shared memory."""
    if ELU1 == 1:
        x = tl.where(m, tl.where(x > 0, x + 1.0, tl.exp(x)), 0.0)
    return x


@triton.jit
def _dfeat(g, x, ELU1: tl.constexpr):
    """g * phi'(x): elu + 1 has slope 1 for x > 0 and exp(x) below (ELU1 = 1); from the features x = phi
    themselves (ELU1 = 2) that slope is min(phi, 1); no feature map (0), slope 1."""
    if ELU1 == 1:
        g = g * tl.where(x > 0, 1.0, tl.exp(x))
    elif ELU1 == 2:
        g = g * tl.minimum(x, 1.0)
    return g


@triton.jit
def _wcols(w, N: tl.constexpr, LOWP: tl.constexpr):
    """The weights w (BT,) as a (BT, N) dot operand: X^T times it has X^T w in its first two columns (w's leading
    bits in column 0, the rest in 1; a bf16 / tf32 operand keeps about 8 / 10 bits of each, so their sum is close
    to float32's X^T w). A weighted column sum on the tensor cores: no shuffles in the serial loop, and the loads w
    comes from feed a dot, so Triton's pipeliner prefetches them like the dots' own operands (the backward's y
    tile was a plain load waited on in every step). N: the state tile's width, as the value tile the same loop
    multiplies; a 16-wide bf16 operand gave wrong sums on the H200 (Triton 3.6; kernels/NOTES.md, session 15)."""
    col = tl.arange(0, N)[None, :]
    if LOWP == 0:  # float32 operands, which a tf32 dot rounds to 10 mantissa bits: keep 10 in the first part
        hi = (w.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    else:
        hi = _cast(w, LOWP).to(tl.float32)
    return _cast(tl.where(col == 0, hi[:, None], tl.where(col == 1, (w - hi)[:, None], 0.0)), LOWP)


@triton.jit
def _lt(idx, N: tl.constexpr, BN: tl.constexpr):
    """idx < N for a tile index of size BN; a constant when tiles divide N, so full tiles carry no column mask."""
    if N % BN == 0:
        m = tl.full([BN], 1, tl.int1)
    else:
        m = idx < N
    return m


@triton.jit
def _keep(M, b, smb, rows, T, HAS_MASK: tl.constexpr):
    """True for real key rows: inside the sequence and not padding."""
    keep = rows < T
    if HAS_MASK:
        pad = tl.load(M + b * smb + rows, mask=rows < T, other=1)
        keep = keep & (pad == 0)
    return keep


@triton.jit
def _run(T, BT: tl.constexpr):
    """This program's run of chunks [c0, c1): program axis 2 splits the chunks into equal runs."""
    NC = tl.cdiv(T, BT)
    per = tl.cdiv(NC, tl.num_programs(2))
    c0 = tl.program_id(2) * per
    return c0, tl.minimum(c0 + per, NC)


@triton.jit
def _scan_kernel(X, Y, NS, N, REVERSE: tl.constexpr, RB: tl.constexpr, BLOCK: tl.constexpr):
    """Y[s] = sum of X[j] over runs j < s (REVERSE: j > s), for one block of the N columns of X (NS, N), float32.
    RB runs at a time: each row is loaded shifted by one run and summed by tl.cumsum, so the exclusive sum never
    subtracts (cumsum - x would lose a small run's digits next to a huge one, e.g. r = 1/eps on an all-padding row)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < N
    ri = tl.arange(0, RB)
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(tl.cdiv(NS, RB)):
        if REVERSE:
            s = NS - (i + 1) * RB + ri  # this block's rows, last block first (s < 0 rows are off)
            src = s + 1
        else:
            s = i * RB + ri
            src = s - 1
        rows = (s >= 0) & (s < NS)
        x = tl.load(X + src.to(tl.int64)[:, None] * N + cols[None, :],
                    mask=(rows & (src >= 0) & (src < NS))[:, None] & cm[None, :], other=0.0)
        y = carry[None, :] + tl.cumsum(x, 0, reverse=REVERSE)
        tl.store(Y + s.to(tl.int64)[:, None] * N + cols[None, :], y, mask=rows[:, None] & cm[None, :])
        carry += tl.sum(x, 0)


@triton.jit
def _state_kernel(K, V, M, SO, ZO, T, H, skb, skh, skt, svb, svh, svt, smb,
                  DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  ELU1: tl.constexpr, HAS_MASK: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    """S = sum_j K_j V_j^T and z = sum_j K_j over this program's run of keys (float32, to SO/ZO[split])."""
    pid_v, bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    c0, c1 = _run(T, BT)
    ck, cv, ti = tl.arange(0, BK), pid_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    mkc, mvc = _lt(ck, DK, BK), _lt(cv, DV, BV)
    K += b.to(tl.int64) * skb + h * skh
    V += b.to(tl.int64) * svb + h * svh
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    for c in range(c0, c1):
        cb = c * BT  # offsets inside one (b, h) slice are int32 (the launcher checks they fit)
        rows = c * BT + ti
        keep = _keep(M, b, smb, rows, T, HAS_MASK)
        mT = mkc[:, None] & keep[None, :]
        kT = _cast(_feat(tl.load(K + cb * skt + ti[None, :] * skt + ck[:, None], mask=mT, other=0.0)
                         .to(tl.float32), mT, ELU1), LOWP)  # z from the rounded features too, as in _fwd_kernel
        v = tl.load(V + cb * svt + ti[:, None] * svt + cv[None, :], mask=(rows[:, None] < T) & mvc[None, :],
                    other=0.0)
        S += tl.dot(kT, _cast(v, LOWP), input_precision=PREC)
        z += tl.sum(kT.to(tl.float32), 1)
    base = (pid_s * tl.num_programs(1) + bh).to(tl.int64)
    tl.store(SO + base * DK * DV + ck[:, None] * DV + cv[None, :], S, mask=mkc[:, None] & mvc[None, :])
    if pid_v == 0:
        tl.store(ZO + base * DK + ck, z, mask=mkc)


@triton.jit
def _prefix_kernel(X, Y, O, R, DD, M, SO, ZO, T, H, sxb, sxh, sxt, syb, syh, syt, sob, soh, sot, smb,
                   DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   NVT: tl.constexpr, REVERSE: tl.constexpr, ELU1: tl.constexpr, HAS_MASK: tl.constexpr,
                   ROW_SCALE: tl.constexpr, WEIGHT: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    """The state each chunk starts from, for chunk-parallel kernels (one run per chunk), in one serial pass per
    (b, h, BK x BV state tile; NVT tiles across dv), as fla's chunk_fwd_h: SO[c] = sum over the chunks before c
    (REVERSE: after c) of phi(X_j)^T (s_j Y_j) and ZO[c] = the sum of w_j phi(X_j) (a dot too, with _wcols), summed
    in float32 registers; SO stored in its dtype (bf16 where the consumer rounds the state to bf16 for its dot).
    Forward: X = k (padding keys zeroed), Y = v, s = w = 1 (WEIGHT 0). Backward, REVERSE: X = q, Y = dy, s = r
    (ROW_SCALE) and w = dden, read from DD (WEIGHT 1) or computed here as -r (dy . y) from the whole dv row and
    stored to DD (2), or w = 0 (3: no normalizer)."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    pk, pv = pid // NVT, pid % NVT
    b, h = bh // H, bh % H
    nbh = tl.num_programs(1)
    ck, cv, ti = pk * BK + tl.arange(0, BK), pv * BV + tl.arange(0, BV), tl.arange(0, BT)
    mkc, mvc = ck < DK, cv < DV
    X += b.to(tl.int64) * sxb + h * sxh
    Y += b.to(tl.int64) * syb + h * syh
    O += b.to(tl.int64) * sob + h * soh
    R += bh.to(tl.int64) * T
    DD += bh.to(tl.int64) * T
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK, BV], dtype=tl.float32)  # z = its row sums: X^T times _wcols(w), as S is X^T times Y
    NC = tl.cdiv(T, BT)
    for i in range(NC):
        if REVERSE:
            c = NC - 1 - i
        else:
            c = i
        base = (c * nbh + bh).to(tl.int64)
        tl.store(SO + base * DK * DV + ck[:, None] * DV + cv[None, :], S.to(SO.dtype.element_ty),
                 mask=mkc[:, None] & mvc[None, :])
        if pv == 0:
            tl.store(ZO + base * DK + ck, tl.sum(z, 1), mask=mkc)
        cb = c * BT  # offsets inside one (b, h) slice are int32 (the launcher checks they fit)
        rows = cb + ti
        rmask = rows < T
        mT = mkc[:, None] & _keep(M, b, smb, rows, T, HAS_MASK)[None, :]
        xT = _cast(_feat(tl.load(X + cb * sxt + ti[None, :] * sxt + ck[:, None], mask=mT, other=0.0)
                         .to(tl.float32), mT, ELU1), LOWP)
        my = rmask[:, None] & mvc[None, :]
        y = tl.load(Y + cb * syt + ti[:, None] * syt + cv[None, :], mask=my, other=0.0).to(tl.float32)
        if ROW_SCALE:
            r = tl.load(R + rows, mask=rmask, other=0.0)
        if WEIGHT == 2:
            w = -r * tl.sum(y * tl.load(O + cb * sot + ti[:, None] * sot + cv[None, :], mask=my, other=0.0)
                            .to(tl.float32), 1)
            if pid == 0:
                tl.store(DD + rows, w, mask=rmask)
        elif WEIGHT == 1:
            w = tl.load(DD + rows, mask=rmask, other=0.0)
        if ROW_SCALE:
            y = y * r[:, None]
        S += tl.dot(xT, _cast(y, LOWP), input_precision=PREC)
        if WEIGHT == 0:
            w = tl.full([BT], 1.0, tl.float32)
        if WEIGHT != 3:
            z = tl.dot(xT, _wcols(w, BV, LOWP), z, input_precision=PREC)


@triton.jit
def _fwd_kernel(Q, K, V, O, S0, Z0, R, M, T, H, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, smb,
                s0s, z0s, eps,
                DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_S0: tl.constexpr, ELU1: tl.constexpr, NORM: tl.constexpr,
                SCALE: tl.constexpr, HAS_MASK: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
                CARRY: tl.constexpr):
    """y over this program's run of query chunks, starting from S0/Z0[split] (stride s0s/z0s) when HAS_S0.
    NORM: writes r = 1/(den + eps) to R (float32, (B*H, T)) for the backward; SCALE: reads a row scale from R."""
    pid_v, bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    c0, c1 = _run(T, BT)
    ck, cv, ti = tl.arange(0, BK), pid_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    mkc, mvc = _lt(ck, DK, BK), _lt(cv, DV, BV)
    Q += b.to(tl.int64) * sqb + h * sqh
    K += b.to(tl.int64) * skb + h * skh
    V += b.to(tl.int64) * svb + h * svh
    O += b.to(tl.int64) * sob + h * soh
    R += bh.to(tl.int64) * T
    if HAS_S0:
        S = tl.load(S0 + pid_s * s0s + bh.to(tl.int64) * DK * DV + ck[:, None] * DV + cv[None, :],
                    mask=mkc[:, None] & mvc[None, :], other=0.0).to(tl.float32)
        z = tl.load(Z0 + pid_s * z0s + bh.to(tl.int64) * DK + ck, mask=mkc, other=0.0)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    for c in range(c0, c1):
        cb = c * BT  # offsets inside one (b, h) slice are int32 (the launcher checks they fit)
        rows = c * BT + ti
        rmask = rows < T
        mq = rmask[:, None] & mkc[None, :]
        q = _feat(tl.load(Q + cb * sqt + ti[:, None] * sqt + ck[None, :], mask=mq, other=0.0).to(tl.float32),
                  mq, ELU1)
        qc = _cast(q, LOWP)
        num = tl.dot(qc, _cast(S, LOWP), input_precision=PREC)
        if NORM:
            den = tl.sum(qc.to(tl.float32) * z[None, :], 1)
        if CAUSAL:
            keep = _keep(M, b, smb, rows, T, HAS_MASK)
            mT = mkc[:, None] & keep[None, :]
            kT = _cast(_feat(tl.load(K + cb * skt + ti[None, :] * skt + ck[:, None], mask=mT, other=0.0)
                             .to(tl.float32), mT, ELU1), LOWP)
            v = _cast(tl.load(V + cb * svt + ti[:, None] * svt + cv[None, :],
                              mask=rmask[:, None] & mvc[None, :], other=0.0), LOWP)
            A = tl.dot(qc, kT, input_precision=PREC)
            A = _cast(tl.where(rows[:, None] >= rows[None, :], A, 0.0), LOWP)
            num += tl.dot(A, v, input_precision=PREC)
            if NORM:  # the rounded scores, as in num: rounding them then mostly cancels in num / den
                den += tl.sum(A.to(tl.float32), 1)
            if CARRY:  # (runs of one chunk never use the state again)
                S += tl.dot(kT, v, input_precision=PREC)
                z += tl.sum(kT.to(tl.float32), 1)
        if NORM:
            r = 1.0 / (den + eps)
            num = num * r[:, None]
            if pid_v == 0:
                tl.store(R + rows, r, mask=rmask)
        elif SCALE:
            num = num * tl.load(R + rows, mask=rmask, other=0.0)[:, None]
        tl.store(O + cb * sot + ti[:, None] * sot + cv[None, :], num.to(O.dtype.element_ty),
                 mask=rmask[:, None] & mvc[None, :])


@triton.jit
def _bwd_q_kernel(Q, K, V, O, DO, DQ, S0, Z0, R, DD, RO, WO, M, T, H,
                  sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdb, sdh, sdt, sgv, sgb, sgh, sgt, smb,
                  s0s, z0s,
                  DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_S0: tl.constexpr, ACC_R: tl.constexpr, ELU1: tl.constexpr,
                  NORM: tl.constexpr, SCALE: tl.constexpr, DDEN_INLINE: tl.constexpr, HAS_MASK: tl.constexpr,
                  LOWP: tl.constexpr, PREC: tl.constexpr, CARRY: tl.constexpr):
    """dq over this program's run of query chunks (dv-tile partial at DQ + pid_v * sgv). NORM: dden = -r (dy . y)
    is computed here from the full row when one dv-tile covers dv (DDEN_INLINE; stored to DD for the key side),
    else read from DD. ACC_R: also sums this run's R = sum Q^T dnum and w = sum dden Q (to RO, WO[split])."""
    pid_v, bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    c0, c1 = _run(T, BT)
    ck, cv, ti = tl.arange(0, BK), pid_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    mkc, mvc = _lt(ck, DK, BK), _lt(cv, DV, BV)
    Q += b.to(tl.int64) * sqb + h * sqh
    K += b.to(tl.int64) * skb + h * skh
    V += b.to(tl.int64) * svb + h * svh
    O += b.to(tl.int64) * sob + h * soh
    DO += b.to(tl.int64) * sdb + h * sdh
    DQ += pid_v.to(tl.int64) * sgv + b.to(tl.int64) * sgb + h * sgh
    R += bh.to(tl.int64) * T
    DD += bh.to(tl.int64) * T
    first = pid_v == 0  # the dden terms do not depend on the dv-tile: one tile adds them
    if HAS_S0:
        St = tl.load(S0 + pid_s * s0s + bh.to(tl.int64) * DK * DV + ck[None, :] * DV + cv[:, None],
                     mask=mkc[None, :] & mvc[:, None], other=0.0).to(tl.float32)
        z = tl.load(Z0 + pid_s * z0s + bh.to(tl.int64) * DK + ck, mask=mkc, other=0.0)
    else:
        St = tl.zeros([BV, BK], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    if ACC_R:
        Racc = tl.zeros([BK, BV], dtype=tl.float32)
        wacc = tl.zeros([BK], dtype=tl.float32)
    for c in range(c0, c1):
        cb = c * BT  # offsets inside one (b, h) slice are int32 (the launcher checks they fit)
        rows = c * BT + ti
        rmask = rows < T
        mv = rmask[:, None] & mvc[None, :]
        do = tl.load(DO + cb * sdt + ti[:, None] * sdt + cv[None, :], mask=mv, other=0.0).to(tl.float32)
        if NORM or SCALE:
            r = tl.load(R + rows, mask=rmask, other=0.0)
            dnum = do * r[:, None]
        else:
            dnum = do
        if NORM:
            if DDEN_INLINE:
                y = tl.load(O + cb * sot + ti[:, None] * sot + cv[None, :], mask=mv, other=0.0).to(tl.float32)
                dden = -r * tl.sum(do * y, 1)
                tl.store(DD + rows, dden, mask=rmask)
            else:
                dden = tl.load(DD + rows, mask=rmask, other=0.0)
            dden = tl.where(first, dden, 0.0)
        dnc = _cast(dnum, LOWP)
        dq = tl.dot(dnc, _cast(St, LOWP), input_precision=PREC)
        if NORM:
            dq += dden[:, None] * z[None, :]
        mq = rmask[:, None] & mkc[None, :]
        qraw = tl.load(Q + cb * sqt + ti[:, None] * sqt + ck[None, :], mask=mq, other=0.0).to(tl.float32)
        if CAUSAL:
            keep = _keep(M, b, smb, rows, T, HAS_MASK)
            mk = keep[:, None] & mkc[None, :]
            kc = _cast(_feat(tl.load(K + cb * skt + ti[:, None] * skt + ck[None, :], mask=mk, other=0.0)
                             .to(tl.float32), mk, ELU1), LOWP)
            vT = _cast(tl.load(V + cb * svt + ti[None, :] * svt + cv[:, None],
                               mask=rmask[None, :] & mvc[:, None], other=0.0), LOWP)
            G = tl.dot(dnc, vT, input_precision=PREC)
            if NORM:
                G += dden[:, None]
            G = tl.where(rows[:, None] >= rows[None, :], G, 0.0)
            dq += tl.dot(_cast(G, LOWP), kc, input_precision=PREC)
            if CARRY:
                St += tl.dot(vT, kc, input_precision=PREC)
                z += tl.sum(kc.to(tl.float32), 0)
        if ACC_R:
            qT = _cast(tl.trans(_feat(qraw, mq, ELU1)), LOWP)
            Racc += tl.dot(qT, dnc, input_precision=PREC)
            if NORM:
                wacc += tl.sum(qT.to(tl.float32) * dden[None, :], 1)
        dq = _dfeat(dq, qraw, ELU1)
        tl.store(DQ + cb * sgt + ti[:, None] * sgt + ck[None, :], dq.to(DQ.dtype.element_ty), mask=mq)
    if ACC_R:
        base = (pid_s * tl.num_programs(1) + bh).to(tl.int64)
        tl.store(RO + base * DK * DV + ck[:, None] * DV + cv[None, :], Racc,
                 mask=mkc[:, None] & mvc[None, :])
        if first:
            tl.store(WO + base * DK + ck, wacc, mask=mkc)


@triton.jit
def _bwd_kv_kernel(Q, K, V, DO, DK_, DV_, R0, W0, R, DD, M, T, TQ, H,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgv, sgb, sgh, sgt, sub, suh, sut, smb,
                   r0s, w0s,
                   DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_R0: tl.constexpr, ELU1: tl.constexpr, NORM: tl.constexpr,
                   SCALE: tl.constexpr, HAS_MASK: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
                   CARRY: tl.constexpr):
    """dk (dv-tile partial) and dv over this program's run of key chunks, last chunk first, carrying
    R = sum_{t>=j} Q_t dnum_t^T and w = sum_{t>=j} dden_t Q_t from R0/W0[split] (the later runs, or everything
    when bidirectional) when HAS_R0."""
    pid_v, bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    c0, c1 = _run(T, BT)
    ck, cv, ti = tl.arange(0, BK), pid_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    mkc, mvc = _lt(ck, DK, BK), _lt(cv, DV, BV)
    Q += b.to(tl.int64) * sqb + h * sqh
    K += b.to(tl.int64) * skb + h * skh
    V += b.to(tl.int64) * svb + h * svh
    DO += b.to(tl.int64) * sdb + h * sdh
    DK_ += pid_v.to(tl.int64) * sgv + b.to(tl.int64) * sgb + h * sgh
    DV_ += b.to(tl.int64) * sub + h * suh
    R += bh.to(tl.int64) * TQ
    DD += bh.to(tl.int64) * TQ
    first = pid_v == 0
    if HAS_R0:
        Rs = tl.load(R0 + pid_s * r0s + bh.to(tl.int64) * DK * DV + ck[:, None] * DV + cv[None, :],
                     mask=mkc[:, None] & mvc[None, :], other=0.0).to(tl.float32)
        w = tl.load(W0 + pid_s * w0s + bh.to(tl.int64) * DK + ck, mask=mkc, other=0.0)
        w = tl.where(first, w, 0.0)
    else:
        Rs = tl.zeros([BK, BV], dtype=tl.float32)
        w = tl.zeros([BK], dtype=tl.float32)
    for i in range(c0, c1):
        c = c1 - 1 - (i - c0)  # reverse order: the causal state sums the queries at and after this chunk
        cb = c * BT  # offsets inside one (b, h) slice are int32 (the launcher checks they fit)
        rows = c * BT + ti
        rmask = rows < T
        keep = _keep(M, b, smb, rows, T, HAS_MASK)
        mk = keep[:, None] & mkc[None, :]
        kraw = tl.load(K + cb * skt + ti[:, None] * skt + ck[None, :], mask=mk, other=0.0).to(tl.float32)
        kc = _cast(_feat(kraw, mk, ELU1), LOWP)
        mv = rmask[:, None] & mvc[None, :]
        vc = _cast(tl.load(V + cb * svt + ti[:, None] * svt + cv[None, :], mask=mv, other=0.0), LOWP)
        dk = tl.dot(vc, _cast(tl.trans(Rs), LOWP), input_precision=PREC) + w[None, :]
        dv = tl.dot(kc, _cast(Rs, LOWP), input_precision=PREC)
        if CAUSAL:
            mq = rmask[:, None] & mkc[None, :]
            qc = _cast(_feat(tl.load(Q + cb * sqt + ti[:, None] * sqt + ck[None, :], mask=mq, other=0.0)
                             .to(tl.float32), mq, ELU1), LOWP)
            do = tl.load(DO + cb * sdt + ti[:, None] * sdt + cv[None, :], mask=mv, other=0.0).to(tl.float32)
            if NORM or SCALE:
                r = tl.load(R + rows, mask=rmask, other=0.0)
                do = do * r[:, None]
            dnc = _cast(do, LOWP)
            tri = rows[:, None] <= rows[None, :]  # key j (row) sees query t (column) when j <= t
            At = tl.where(tri, tl.dot(kc, tl.trans(qc), input_precision=PREC), 0.0)
            Gt = tl.dot(vc, tl.trans(dnc), input_precision=PREC)
            if NORM:
                dden = tl.where(first, tl.load(DD + rows, mask=rmask, other=0.0), 0.0)
                Gt += dden[None, :]
                if CARRY:
                    w += tl.sum(qc.to(tl.float32) * dden[:, None], 0)
            Gt = tl.where(tri, Gt, 0.0)
            dk += tl.dot(_cast(Gt, LOWP), qc, input_precision=PREC)
            dv += tl.dot(_cast(At, LOWP), dnc, input_precision=PREC)
            if CARRY:
                Rs += tl.dot(tl.trans(qc), dnc, input_precision=PREC)
        dk = tl.where(mk, _dfeat(dk, kraw, ELU1), 0.0)
        tl.store(DK_ + cb * sgt + ti[:, None] * sgt + ck[None, :], dk.to(DK_.dtype.element_ty),
                 mask=rmask[:, None] & mkc[None, :])
        tl.store(DV_ + cb * sut + ti[:, None] * sut + cv[None, :], dv.to(DV_.dtype.element_ty), mask=mv)


@triton.jit
def _bwd_chunk_kernel(Q, K, V, DO, DQ, DK_, DV_, S0, Z0, R0, W0, R, DD, M, T, H,
                      sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgv, sgb, sgh, sgt,
                      shv, shb, shh, sht, sub, suh, sut, smb,
                      DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      ELU1: tl.constexpr, NORM: tl.constexpr, SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
                      LOWP: tl.constexpr, PREC: tl.constexpr):
    """dq, dk, dv of one causal chunk at once, given its prefix state S0, z0[c] and suffix state R0, W0[c] (the
    serial passes), dden in DD: the scores A and G are made once and used both ways (the query-side and key-side
    kernels each remade them and reloaded q, k, v, dy). dq / dk are dv-tile partials at DQ / DK_ + pid_v * sgv /
    shv, as in _bwd_q_kernel / _bwd_kv_kernel; the formulas are theirs."""
    pid_v, bh, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    ck, cv, ti = tl.arange(0, BK), pid_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    mkc, mvc = _lt(ck, DK, BK), _lt(cv, DV, BV)
    cb = c * BT  # offsets inside one (b, h) slice are int32 (the launcher checks they fit)
    rows = cb + ti
    rmask = rows < T
    first = pid_v == 0  # the dden terms do not depend on the dv-tile: one tile adds them
    Q += b.to(tl.int64) * sqb + h * sqh + cb * sqt
    K += b.to(tl.int64) * skb + h * skh + cb * skt
    V += b.to(tl.int64) * svb + h * svh + cb * svt
    DO += b.to(tl.int64) * sdb + h * sdh + cb * sdt
    st = (c * tl.num_programs(1) + bh).to(tl.int64)
    S = tl.load(S0 + st * DK * DV + ck[:, None] * DV + cv[None, :], mask=mkc[:, None] & mvc[None, :], other=0.0)
    Rs = tl.load(R0 + st * DK * DV + ck[:, None] * DV + cv[None, :], mask=mkc[:, None] & mvc[None, :], other=0.0)
    mq = rmask[:, None] & mkc[None, :]
    keep = _keep(M, b, smb, rows, T, HAS_MASK)
    mk = keep[:, None] & mkc[None, :]
    mv = rmask[:, None] & mvc[None, :]
    qraw = tl.load(Q + ti[:, None] * sqt + ck[None, :], mask=mq, other=0.0).to(tl.float32)
    kraw = tl.load(K + ti[:, None] * skt + ck[None, :], mask=mk, other=0.0).to(tl.float32)
    qc, kc = _cast(_feat(qraw, mq, ELU1), LOWP), _cast(_feat(kraw, mk, ELU1), LOWP)
    vc = _cast(tl.load(V + ti[:, None] * svt + cv[None, :], mask=mv, other=0.0), LOWP)
    dnum = tl.load(DO + ti[:, None] * sdt + cv[None, :], mask=mv, other=0.0).to(tl.float32)
    if NORM or SCALE:
        r = tl.load(R + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
        dnum = dnum * r[:, None]
    dnc = _cast(dnum, LOWP)
    causal = rows[:, None] >= rows[None, :]  # query t (row) sees key j (column)
    A = _cast(tl.where(causal, tl.dot(qc, tl.trans(kc), input_precision=PREC), 0.0), LOWP)
    G = tl.dot(dnc, tl.trans(vc), input_precision=PREC)
    dq = tl.dot(dnc, tl.trans(_cast(S, LOWP)), input_precision=PREC)
    dk = tl.dot(vc, tl.trans(_cast(Rs, LOWP)), input_precision=PREC)
    if NORM:
        dden = tl.where(first, tl.load(DD + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0), 0.0)
        z = tl.load(Z0 + st * DK + ck, mask=mkc, other=0.0)
        w = tl.where(first, tl.load(W0 + st * DK + ck, mask=mkc, other=0.0), 0.0)
        G += dden[:, None]
        dq += dden[:, None] * z[None, :]
        dk += w[None, :]
    G = _cast(tl.where(causal, G, 0.0), LOWP)
    dq += tl.dot(G, kc, input_precision=PREC)
    dk += tl.dot(tl.trans(G), qc, input_precision=PREC)
    dv = tl.dot(kc, _cast(Rs, LOWP), input_precision=PREC) + tl.dot(tl.trans(A), dnc, input_precision=PREC)
    if ELU1 == 2:  # the slope from the features loaded again (from L2; ".cg" keeps the loads apart, which CSE
        # would merge): kept from the start, q and k took 28 registers, and 168 (three CTAs per SM) spilled 128 bytes
        qraw = tl.load(Q + ti[:, None] * sqt + ck[None, :], mask=mq, other=0.0, cache_modifier=".cg").to(tl.float32)
        kraw = tl.load(K + ti[:, None] * skt + ck[None, :], mask=mk, other=0.0, cache_modifier=".cg").to(tl.float32)
    dq = _dfeat(dq, qraw, ELU1)
    dk = tl.where(mk, _dfeat(dk, kraw, ELU1), 0.0)
    DQ += pid_v.to(tl.int64) * sgv + b.to(tl.int64) * sgb + h * sgh + cb * sgt
    DK_ += pid_v.to(tl.int64) * shv + b.to(tl.int64) * shb + h * shh + cb * sht
    DV_ += b.to(tl.int64) * sub + h * suh + cb * sut
    tl.store(DQ + ti[:, None] * sgt + ck[None, :], dq.to(DQ.dtype.element_ty), mask=mq)
    tl.store(DK_ + ti[:, None] * sht + ck[None, :], dk.to(DK_.dtype.element_ty), mask=rmask[:, None] & mkc[None, :])
    tl.store(DV_ + ti[:, None] * sut + cv[None, :], dv.to(DV_.dtype.element_ty), mask=mv)


@triton.jit
def _dden_kernel(DO, O, R, DD, T, H, sdb, sdh, sdt, sob, soh, sot, DV: tl.constexpr, BT: tl.constexpr,
                 BV: tl.constexpr):
    """dden = -r (dy . y) over whole rows of dv (several dv-tiles), float32, for the key-side kernels."""
    bh, c = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = c * BT + tl.arange(0, BT)
    rmask = rows < T
    acc = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        cv = v0 + tl.arange(0, BV)
        m = rmask[:, None] & (cv < DV)[None, :]
        do = tl.load(DO + b.to(tl.int64) * sdb + h * sdh + rows[:, None] * sdt + cv[None, :], mask=m, other=0.0)
        o = tl.load(O + b.to(tl.int64) * sob + h * soh + rows[:, None] * sot + cv[None, :], mask=m, other=0.0)
        acc += tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    r = tl.load(R + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    tl.store(DD + bh.to(tl.int64) * T + rows, -r * acc, mask=rmask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers. q, k: (B, H, T|S, d) and v: (B, H, S, dv), any strides with a unit last stride.

def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhtd_empty(B, H, T, d, like):
    """(B, H, T, d) view of a (B, T, H, d) buffer: the layout split_heads makes, so merge_heads is free."""
    return torch.empty(B, T, H, d, device=like.device, dtype=like.dtype).transpose(1, 2)


# Run-time caps on the dv-tile, learned when a launch still ran out of resources (see _shrink): keyed by the
# kernel group, head widths, input bytes and device.
_BV_CAP: dict = {}


def _fit(q, DK, DV, group, warps):
    """Tiles for one group. The chunk length is chosen for all four kernels at once: the backward must cut a
    causal sequence into the same runs as the forward did."""
    key = (group, DK, DV, q.element_size(), str(q.device))
    opts = dict(BV_pref=CONFIG["BV"], state=CONFIG["state"], warps=warps, stages=CONFIG["stages"])
    smem = smem_limit(q.device)
    bt = fit_chunk(GROUPS["fwd"] + GROUPS["bwd"], DK, DV, q.element_size(), smem,
                   BT=(CONFIG["BT"], CONFIG["BT"] // 2), **opts)["BT"]
    return fit_chunk(GROUPS[group], DK, DV, q.element_size(), smem, BT=(bt,), bv_cap=_BV_CAP.get(key), **opts), key


def fwd_runs(q, k, v, causal) -> tuple[int, torch.dtype]:
    """How many start states chunk_fwd returns in S0 / z0 (0: none), and S0's dtype: for fake tensors
    (torch.compile) without launching anything. Mirrors chunk_fwd. (int(): under dynamic shapes the count depends
    on the sizes, so the compiled graph specializes on them.)"""
    B, H, T, DK = (int(n) for n in q.shape)
    DV = int(v.shape[3])
    if DK > 256:
        raise NoFit(f"linear attention kernel: head dim d={DK} > 256 is not supported; use backend='torch'")
    cfg, _ = _fit(q, DK, DV, "fwd", CONFIG["fwd_warps"])
    ns, _ = _plan(B, H, DK, DV, triton.cdiv(DV, cfg["BV"]), T, causal, cfg["BT"], q)
    n = 1 if not causal else (ns if ns > 1 else 0)
    return n, _state_dtype(q, causal and ns == triton.cdiv(T, cfg["BT"]))


def _meta(q, k, v, mask, group, warps):
    """Shapes and the launch configuration of one kernel group ("fwd": state + forward, "bwd": both backward
    kernels), fitted to the device's shared memory and the register budget (kernels/fit.py)."""
    B, H, T, DK = q.shape
    S, DV = k.shape[2], v.shape[3]
    if DK > 256:
        raise NoFit(f"linear attention kernel: head dim d={DK} > 256 is not supported; use backend='torch'")
    lowp = 0 if q.dtype != torch.bfloat16 else (1 if q.is_cuda else 2)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    cfg, key = _fit(q, DK, DV, group, warps)
    BK, BV = cfg["BK"], cfg["BV"]
    if max(T, S) * max(q.stride(2), k.stride(2), v.stride(2), H * max(DK, DV)) >= 2 ** 31:
        raise ValueError(f"linear attention kernel: sequence too long for int32 offsets (T={T}, S={S}); split it")
    m = mask.view(torch.uint8) if mask is not None else q  # dummy pointer when there is no mask
    smb = mask.stride(0) if mask is not None else 0
    common = dict(DK=DK, DV=DV, BT=cfg["BT"], BK=BK, BV=BV, HAS_MASK=mask is not None, LOWP=lowp, PREC=prec)
    opts = dict(num_warps=cfg["warps"], num_stages=cfg["stages"])
    if CONFIG.get("maxnreg"):
        opts["maxnreg"] = CONFIG["maxnreg"]
    return B, H, T, S, DK, DV, triton.cdiv(DV, BV), m, smb, common, opts, key


def _retry(fn):
    """Run a launcher; if a launch still runs out of resources although the estimate said it fits (another
    compiler version), cap that group's dv-tile at half and run it again. Nothing was written by the failed
    launch: Triton checks resources before launching."""
    def wrapped(*args, **kwargs):
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - only OutOfResources is retried, the rest re-raised
                info = getattr(err, "_attnlab_group", None)
                if not is_oor(err) or info is None or info[1] <= 16:
                    raise
                key, BV = info
                _BV_CAP[key] = BV // 2
                warnings.warn(f"linear attention kernels {key}: {err}; retrying with dv-tile {BV // 2} "
                              f"(kernels/fit.py's estimate was too low for this compiler)")
    wrapped.__doc__ = fn.__doc__
    wrapped.__name__ = fn.__name__
    return wrapped


def _tag(err, key, BV):
    err._attnlab_group = (key, BV)
    return err


def _splits(B, H, NV, n_rows, causal, BT):
    """Runs per (b, h, dv-tile): enough programs to fill the GPU. Bidirectional runs cost nothing extra (partial
    sums); causal ones need a pass over k, v for the run states, so only long sequences, or too few programs, are
    split."""
    chunks = triton.cdiv(n_rows, BT)
    if causal and chunks < CONFIG["run_min_chunks"] and B * H * NV >= CONFIG["fill"]:
        return 1
    if causal and chunks <= CONFIG["one_chunk_runs"]:
        return chunks
    target = CONFIG["programs"] if causal else 4 * 132
    return max(1, min(chunks, triton.cdiv(target, B * H * NV)))


def _serial_tiles(B, H, DK, DV, n_rows, BT, in_bytes, smem):
    """(BK, BV): the state tiles of _prefix_kernel, narrowed (not below what 16-bit dots allow, kernels/fit.py)
    until about CONFIG["serial_programs"] (b, h, tile) programs run and two pipeline stages fit ``smem``; None where
    even the narrowest give fewer programs: there a serial pass over all chunks would leave most of the GPU idle,
    and runs with a scan are faster."""
    if triton.cdiv(n_rows, BT) < 2:
        return None
    lo, cap, want = MIN_BK.get(in_bytes, 16), CONFIG["serial_tile"], CONFIG["serial_programs"]
    bk, bv = max(lo, min(cap, _p2(DK))), max(lo, min(cap, _p2(DV)))

    def ok():  # enough programs, and two pipeline stages fit
        return (B * H * triton.cdiv(DK, bk) * triton.cdiv(DV, bv) >= want
                and chunk_smem("prefix", BT, bk, bv, in_bytes, 2) <= smem)
    while not ok() and max(bk, bv) > lo:
        if bv >= bk:
            bv //= 2
        else:
            bk //= 2
    return (bk, bv) if ok() else None


def _plan(B, H, DK, DV, NV, n_rows, causal, BT, x):
    """(runs per (b, h, dv-tile), the serial pass's state tiles or None) for inputs like x: a causal sequence with
    enough heads gets one run per chunk, their start states from _prefix_kernel; otherwise _splits decides and a
    scan sums runs."""
    tiles = _serial_tiles(B, H, DK, DV, n_rows, BT, x.element_size(), smem_limit(x.device)) if causal else None
    return (triton.cdiv(n_rows, BT), tiles) if tiles else (_splits(B, H, NV, n_rows, causal, BT), None)


def _state_dtype(q, one_chunk_runs):
    """dtype of the saved run start states: bf16 for bf16 inputs when every run is one chunk (the kernels then only
    round a start state to bf16 for their dots, so storing it rounded is exact and halves its traffic); float32
    where a run adds its chunks to it. The z / w sums stay float32 (d floats per run)."""
    return torch.bfloat16 if one_chunk_runs and q.dtype == torch.bfloat16 else torch.float32


def _carry(causal, runs, n_rows, BT):
    """False when every causal run is one chunk: the kernels then skip updating a state nothing reads again."""
    return not causal or runs < triton.cdiv(n_rows, BT)


def exclusive_scan(x, reverse=False, dtype=torch.float32):
    """Exclusive sum over the runs (dim 0) of a float32 (runs, ...) tensor: the state each run starts from (reverse:
    the backward's key-side runs, summing the later runs). One pass of _scan_kernel (torch's cumsum, flip and cat
    took 0.43 of the 0.77 ms of linear attention fwd+bwd at B=1, H=8, T=16384 on an H200)."""
    ns = x.shape[0]
    n = x[0].numel()
    y = torch.empty(x.shape, device=x.device, dtype=dtype)  # summed in float32 either way
    rb = max(16, min(64, triton.next_power_of_2(ns)))
    _scan_kernel[(triton.cdiv(n, 64),)](x, y, ns, n, REVERSE=reverse, RB=rb, BLOCK=64, num_warps=4)
    return y


def _starts(x, causal, reverse=False, dtype=torch.float32):
    """Each run's starting state from the runs' own sums x (runs, ...): causal, the sum of the earlier runs (reverse:
    of the later ones) in ``dtype``; bidirectional, one shared total."""
    return exclusive_scan(x, reverse, dtype) if causal else x.sum(0, keepdim=True)


def _prefix(x, y, o, r, dd, m, smb, T, B, H, tiles, common, *, reverse, elu1, has_mask, row_scale, weight):
    """Every chunk's start state (SO, ZO) from one serial pass per (b, h, state tile): see _prefix_kernel."""
    DK, DV = x.shape[3], y.shape[3]
    bk, bv = tiles
    nc, nvt = triton.cdiv(T, common["BT"]), triton.cdiv(DV, bv)
    SO = torch.empty(nc, B * H, DK, DV, device=x.device, dtype=_state_dtype(x, True))
    ZO = torch.empty(nc, B * H, DK, device=x.device, dtype=torch.float32)
    o = o if o is not None else x  # dummy pointers where the constexpr branches read nothing
    stages, smem = CONFIG["serial_stages"], smem_limit(x.device)
    while stages > 2 and chunk_smem("prefix", common["BT"], bk, bv, x.element_size(), stages) > smem:
        stages -= 1
    _prefix_kernel[(triton.cdiv(DK, bk) * nvt, B * H)](
        x, y, o, r if r is not None else x, dd, m, SO, ZO, T, H, *x.stride()[:3], *y.stride()[:3], *o.stride()[:3],
        smb, **{**common, "BK": bk, "BV": bv, "HAS_MASK": has_mask}, NVT=nvt, REVERSE=reverse, ELU1=elu1,
        ROW_SCALE=row_scale, WEIGHT=weight, num_warps=CONFIG["serial_warps"], num_stages=stages)
    return SO, ZO


@_retry
def chunk_fwd(q, k, v, *, causal, elu1, norm, eps=1e-6, scale=None, mask=None):
    """Returns (o, r, S0, z0): o (B, H, T, dv) in q's dtype; r (B*H, T) float32 = 1/(den+eps) when norm (else the
    given scale, or None); S0, z0 (runs, B*H, d, dv) / (runs, B*H, d) the states each run starts from (bidirectional:
    one, the total; causal without runs: None), saved for the backward: z0 float32, S0 in _state_dtype.
    elu1: the kernels map q and k by elu + 1 (1 / True), or q and k are the features (0 / False; 2: elu + 1 of the
    inputs, mapped by feature.py, which matters only to the backward's slope)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, T, S, DK, DV, NV, m, smb, common, opts, key = _meta(q, k, v, mask, "fwd", CONFIG["fwd_warps"])
    try:
        return _fwd(q, k, v, causal, elu1, norm, eps, scale, B, H, T, S, DK, DV, NV, m, smb, common, opts)
    except Exception as err:
        raise _tag(err, key, common["BV"])


def _fwd(q, k, v, causal, elu1, norm, eps, scale, B, H, T, S, DK, DV, NV, m, smb, common, opts):
    dev, f32 = q.device, torch.float32
    o = _bhtd_empty(B, H, T, DV, q)
    r = torch.empty(B * H, T, device=dev, dtype=f32) if norm else scale
    ns, tiles = _plan(B, H, DK, DV, NV, T, causal, common["BT"], q)
    S0 = z0 = None
    if tiles:
        S0, z0 = _prefix(k, v, None, None, k, m, smb, T, B, H, tiles, common, reverse=False, elu1=elu1,
                         has_mask=common["HAS_MASK"], row_scale=False, weight=0)
    elif not causal or ns > 1:
        nk = ns if causal else _splits(B, H, NV, S, False, common["BT"])
        Sp = torch.empty(nk, B * H, DK, DV, device=dev, dtype=f32)
        zp = torch.empty(nk, B * H, DK, device=dev, dtype=f32)
        _state_kernel[(NV, B * H, nk)](k, v, m, Sp, zp, S, H, *k.stride()[:3], *v.stride()[:3], smb,
                                       ELU1=elu1, **common, **opts)
        S0 = _starts(Sp, causal, dtype=_state_dtype(q, causal and ns == triton.cdiv(T, common["BT"])))
        z0 = _starts(zp, causal)
    run = S0 is not None and S0.shape[0] > 1  # per-run start states; else one shared (or none)
    _fwd_kernel[(NV, B * H, ns)](q, k, v, o, q if S0 is None else S0, q if z0 is None else z0,
                                 q if r is None else r, m, T, H, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                 *o.stride()[:3], smb, S0.stride(0) if run else 0, z0.stride(0) if run else 0, eps,
                                 CAUSAL=causal, HAS_S0=S0 is not None, ELU1=elu1, NORM=norm, SCALE=scale is not None,
                                 CARRY=_carry(causal, ns, T, common["BT"]), **common,
                                 **{**opts, **(reg_cap(CONFIG, "fwd", q) if common["BK"] * common["BV"] <= 4096
                                               else {})})
    return o, r, S0, z0


@_retry
def chunk_bwd(q, k, v, o, do, r, S0, z0, *, causal, elu1, norm, scale=False, mask=None):
    """Gradients (dq, dk, dv) of chunk_fwd's o, given what it returned. ``scale``: r is a given row scale. elu1 as
    in chunk_fwd; with 2, q and k are the features phi and dq, dk the gradients of the inputs they were mapped from
    (the slope min(phi, 1), _dfeat)."""
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    run = causal and S0 is not None and S0.shape[0] > 1
    B, H, T, S, DK, DV, NV, m, smb, common, opts, key = _meta(q, k, v, mask, "bwd",
                                                             CONFIG["run_bwd_warps" if run else "bwd_warps"])
    try:
        return _bwd(q, k, v, o, do, r, S0, z0, causal, elu1, norm, scale, B, H, T, S, DK, DV, NV, m, smb, common,
                    opts)
    except Exception as err:
        raise _tag(err, key, common["BV"])


def _bwd(q, k, v, o, do, r, S0, z0, causal, elu1, norm, scale, B, H, T, S, DK, DV, NV, m, smb, common, opts):
    dev, f32 = q.device, torch.float32
    # dq / dk: straight into q/k-shaped tensors when one dv-tile covers dv, else float32 partials per tile
    dq = torch.empty_like(q) if NV == 1 else torch.empty(NV, B, H, T, DK, device=dev, dtype=f32)
    dk = torch.empty_like(k) if NV == 1 else torch.empty(NV, B, H, S, DK, device=dev, dtype=f32)
    dv = torch.empty_like(v)
    gq = (0, *dq.stride()[:3]) if NV == 1 else dq.stride()[:4]
    gk = (0, *dk.stride()[:3]) if NV == 1 else dk.stride()[:4]
    dd = torch.empty(B * H, T, device=dev, dtype=f32) if norm else q  # dden = -r (dy . y)
    # runs: causal must reuse the forward's (S0 holds their start states); bidirectional picks its own
    ns_q = (S0.shape[0] if S0 is not None else 1) if causal else _splits(B, H, NV, T, False, common["BT"])
    run = causal and ns_q > 1
    nc = triton.cdiv(T, common["BT"])
    tiles = _serial_tiles(B, H, DK, DV, T, common["BT"], q.element_size(), smem_limit(q.device)) \
        if run and ns_q == nc else None
    # dden = -r (dy . y) needs whole rows of dy and y: computed by the first kernel that holds them (the serial
    # pass, else the query-side kernel) when one tile covers dv, else by _dden_kernel
    pre_inline = bool(tiles) and norm and tiles[1] >= DV
    inline = norm and NV == 1 and not tiles
    if norm and not inline and not pre_inline:
        _dden_kernel[(B * H, nc)](do, o, r, dd, T, H, *do.stride()[:3], *o.stride()[:3], DV=DV, BT=common["BT"],
                                  BV=min(128, max(16, triton.next_power_of_2(DV))), num_warps=4)
    rr = r if r is not None else q
    o_ = o if o is not None else q
    if tiles:  # every chunk's suffix state R, w from a serial pass; then each chunk's dq, dk, dv in one program
        R0, W0 = _prefix(q, do, o_, rr, dd, m, smb, T, B, H, tiles, common, reverse=True, elu1=elu1,
                         has_mask=False, row_scale=norm or scale, weight=2 if pre_inline else 1 if norm else 3)
        _bwd_chunk_kernel[(NV, B * H, nc)](q, k, v, do, dq, dk, dv, S0, z0, R0, W0, rr, dd, m, T, H,
                                           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *gq,
                                           *gk, *dv.stride()[:3], smb, ELU1=elu1, NORM=norm, SCALE=scale, **common,
                                           num_warps=CONFIG["chunk_bwd_warps"], num_stages=opts["num_stages"],
                                           **(reg_cap(CONFIG, "chunk_bwd", q) if q.dtype == torch.bfloat16
                                              and common["BK"] * common["BV"] <= 4096 else {}))
    else:  # by runs: the query-side kernel (dq; the runs' R, w sums for a scan), a scan, the key-side kernel
        acc_r = not causal or run
        Rp = Wp = q
        if acc_r:
            Rp = torch.empty(ns_q, B * H, DK, DV, device=dev, dtype=f32)
            Wp = torch.zeros(ns_q, B * H, DK, device=dev, dtype=f32)  # zeros: without NORM nothing is written
        _bwd_q_kernel[(NV, B * H, ns_q)](q, k, v, o_, do, dq, q if S0 is None else S0, q if z0 is None else z0,
                                         rr, dd, Rp, Wp, m, T, H, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                         *o_.stride()[:3], *do.stride()[:3], *gq, smb,
                                         S0.stride(0) if run else 0, z0.stride(0) if run else 0,
                                         CAUSAL=causal, HAS_S0=S0 is not None, ACC_R=acc_r, ELU1=elu1, NORM=norm,
                                         SCALE=scale, DDEN_INLINE=inline, CARRY=_carry(causal, ns_q, T, common["BT"]),
                                         **common, **opts)
        R0 = W0 = q
        if acc_r:
            R0 = _starts(Rp, causal, reverse=True, dtype=_state_dtype(q, causal and ns_q == nc))
            W0 = _starts(Wp, causal, reverse=True)
        ns_k = ns_q if causal else _splits(B, H, NV, S, False, common["BT"])
        _bwd_kv_kernel[(NV, B * H, ns_k)](q, k, v, do, dk, dv, R0, W0, rr, dd, m, S, T, H, *q.stride()[:3],
                                          *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *gk, *dv.stride()[:3],
                                          smb, R0.stride(0) if run else 0, W0.stride(0) if run else 0,
                                          CAUSAL=causal, HAS_R0=acc_r, ELU1=elu1, NORM=norm, SCALE=scale,
                                          CARRY=_carry(causal, ns_k, S, common["BT"]), **common, **opts)
    if NV > 1:
        dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
    return dq, dk, dv
