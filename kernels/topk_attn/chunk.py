"""Fused top-k attention kernels (Triton).

For one query row i with scores s_ij = q_i . k_j over the keys it may see (causal, padding), keep the k largest,
softmax them (times ``scale``) and sum the matching values. The forward never stores a score matrix; one program
takes a tile of BM query rows and sweeps the keys twice:

1. Group maxima. Key j belongs to group j mod BN (the column of its key tile); the tile keeps the running max of
   each group (one max per score). The k-th largest of the BN group maxima, tau, is a lower bound of the row's
   k-th largest score: the top-k group maxima are k distinct scores >= tau. With BN = 128 groups and k = 64 about
   88 scores of a random row reach tau, at most ~116 in 16k rows (interleaved groups also split up runs of similar
   neighbouring keys).
2. Candidates. The same scores again; every s_ij >= tau goes to a per-program scratch row of CAP slots, at its
   running count in the row. If a row has more than CAP candidates (ties, adversarial rows), tau rises to the
   k-th largest stored candidate and the sweep repeats for that tile; then scores compare lexicographically as
   (score, -key) so ties cannot stall it. Each repeat keeps >= k candidates and drops >= 1.
3. Selection. Each row's candidates (<= CAP) are packed as int64 (order-preserving score bits, inverted key
   index) and sorted (tl.topk, or tl.sort where Triton has no tl.topk) once; the first k are the top-k. Their
   softmax P and key indices I are stored (B, H, T, k); _out_kernel then gathers out_i = sum_j P_ij v_j.

Top-k selection does not depend on ``scale`` > 0, so the sweeps compare raw dots and scale only the k survivors.
Both sweeps compute the score tile with the same code and shapes, so they see the same bits; tau is still
lowered by a relative 2^-12 margin so an ulp of difference could only add candidates, never lose one.

The grid is persistent (a few programs per SM) because each program needs a BM x CAP scratch: B*H*T*CAP would
not fit at long T. Tiles go head-major (programs running together share one head's K and V in L2), the longest
causal rows first. Measured costs and the versions tried: kernels/topk_attn/NOTES.md.

Backward: with dP_j = dO . v_j, delta = dO . O and dS_j = P_j (dP_j - delta) (scaled), a program of BMB query
rows gathers its k selected keys and values:  dQ_i = scale sum_j dS_ij k_j  directly, and dK_j += scale dS_ij q_i,
dV_j += P_ij dO_i  by float32 atomic adds (a transposed pass would need each key's list of selecting queries,
i.e. a sort of T*k indices, or a T x S sweep). That is O(T * k * d) work and memory traffic, nothing T x S.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fit import fit_topk, smem_limit

# BM query rows per forward tile, BN keys per score tile (= number of groups, >= k), CAP candidate slots per
# row (>= 2k), BS rows per selection step; BMB / BMG query rows and KC slots per step of the backward / output
# gather. fast: the GPU-only sweep 2 (see _candidates). Tuned on an H100 by bench/check_topk_gpu.py (NOTES.md).
CONFIG = {"BM": 64, "BN": 128, "CAP": 128, "BS": 16, "fwd_warps": 4, "fwd_stages": 2, "progs_per_sm": 2,
          "BMB": 16, "KC": 4, "bwd_warps": 4, "BMG": 16, "out_warps": 4, "fast": True}
MAX_TOPK = 128  # larger k: the chunked PyTorch path
HAS_TOPK = hasattr(tl, "topk")
SENT = tl.constexpr(-(2 ** 63))  # packed key below every real candidate: an empty slot
NEG = tl.constexpr(float("-inf"))
LOG2E = 1.4426950408889634


@triton.jit
def _key_tile(K, n0, S, DK, skt, BN: tl.constexpr, DP: tl.constexpr, UPCAST: tl.constexpr):
    """Keys n0 .. n0+BN-1 (BN x DP, zero past S and DK)."""
    cols = n0 + tl.arange(0, BN)
    cd = tl.arange(0, DP)
    k = tl.load(K + cols[:, None] * skt + cd[None, :], mask=(cols[:, None] < S) & (cd[None, :] < DK), other=0.0)
    if UPCAST:  # the interpreter's dot on bf16 is wrong: the same (exact) values in float32
        k = k.to(tl.float32)
    return k


@triton.jit
def _tile_scores(q, k, KPM, rows, n0, m0, off, S, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                 PREC: tl.constexpr):
    """Raw dots q . k_j of the key tile k (keys n0..), -inf where the query may not look (causal, padding, past S)."""
    cols = n0 + tl.arange(0, BN)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if HAS_PAD:
        pad = tl.load(KPM + cols, mask=cols < S, other=1)
        s = s + tl.where(pad != 0, NEG, 0.0)[None, :]
    edge = n0 + BN > S
    if CAUSAL:
        edge = edge | (n0 + BN - 1 > m0 + off)
    if edge:  # only the last tile and the diagonal tiles pay for the mask
        ok = cols[None, :] < S
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + off)
        s = tl.where(ok, s, NEG)
    return s


@triton.jit
def _scores(q, K, KPM, rows, n0, m0, off, S, DK, skt,
            BN: tl.constexpr, DP: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PREC: tl.constexpr,
            UPCAST: tl.constexpr):
    """Raw dots q . k_j of the key tile at n0, loaded here, masked as _tile_scores."""
    return _tile_scores(q, _key_tile(K, n0, S, DK, skt, BN, DP, UPCAST), KPM, rows, n0, m0, off, S, BN, CAUSAL,
                        HAS_PAD, PREC)


@triton.jit
def _row_tile(Q, K, KPM, b, h, m0, T, S, DK, off, sqb, sqh, sqt, skb, skh, smb,
              BM: tl.constexpr, DP: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    """Query rows m0 .. m0+BM-1 of head (b, h): the rows, their mask, the q tile, the head's K and padding-mask
    pointers, and the end of the keys those rows may see."""
    rows = m0 + tl.arange(0, BM)
    rmask = rows < T
    cd = tl.arange(0, DP)
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqt + cd[None, :],
                mask=rmask[:, None] & (cd[None, :] < DK), other=0.0)
    if UPCAST:  # the interpreter's dot on bf16 is wrong: the same (exact) values in float32
        q = q.to(tl.float32)
    if CAUSAL:
        n_end = tl.minimum(S, m0 + BM + off)
    else:
        n_end = S
    return rows, rmask, q, K + b.to(tl.int64) * skb + h * skh, KPM + b.to(tl.int64) * smb, n_end


@triton.jit
def _store_where(ptr, x, m):
    """st.global of x (int32) to ptr where m, as inline PTX: the store stays in x's register layout (tl.store would
    first move values, masks and pointers into a 'coalesced' layout through shared memory, behind barriers)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $3, 0; @p st.global.b32 [$1], $2; mov.b32 $0, 0; }",
        "=r,l,r,r", [ptr.to(tl.int64), x, m.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _candidates(q, K, KPM, SC, U, ts, tj, lex, rows, rl, m0, n_end, off, S, DK, skt,
                BM: tl.constexpr, BN: tl.constexpr, CAP: tl.constexpr, DP: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_PAD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr):
    """Sweep 2: write every score >= (ts, tj) of the tile's rows to their scratch rows (pairs of int32: score
    bits, key); return the counts (which may exceed CAP: only the first CAP are written).
    lex = 0: plain s >= ts; lex = 1: (s, -j) >= (ts, -tj).
    FAST (GPU): the slot of a candidate is its running count in the row, a prefix sum taken as a 0/1 matrix
    times the upper-triangular ones U on the tensor cores (exact in float32), and the stores are inline PTX:
    both keep the whole sweep in the score tile's register layout. Otherwise tl.cumsum and tl.store."""
    cnt = tl.zeros([BM], dtype=tl.int32)
    for n0 in range(0, n_end, BN):
        s = _scores(q, K, KPM, rows, n0, m0, off, S, DK, skt, BN, DP, CAUSAL, HAS_PAD, PREC, UPCAST)
        cols = n0 + tl.arange(0, BN)
        if lex > 0:
            c = (s > ts[:, None]) | ((s == ts[:, None]) & (cols[None, :] <= tj[:, None]))
        else:
            c = s >= ts[:, None]
        if FAST:
            pos = cnt[:, None] + tl.dot(c.to(tl.bfloat16), U).to(tl.int32) - 1
        else:
            pos = cnt[:, None] + tl.cumsum(c.to(tl.int32), 1) - 1
        st = c & (pos < CAP)
        ptr = SC + (rl[:, None] * CAP + pos) * 2
        jj = cols[None, :] + 0 * pos
        if FAST:  # (score bits, key) pairs
            _store_where(ptr, s.to(tl.int32, bitcast=True), st)
            _store_where(ptr + 1, jj, st)
        else:
            tl.store(ptr, s.to(tl.int32, bitcast=True), mask=st)
            tl.store(ptr + 1, jj, mask=st)
        cnt += tl.sum(c.to(tl.int32), 1)
    return cnt


@triton.jit
def _pack(s, j):
    """(score, key) -> int64 whose signed order is (score, -key): order-preserving float bits on top."""
    b = s.to(tl.int32, bitcast=True)
    o = b ^ ((b >> 31) & 0x7FFFFFFF)
    return (o.to(tl.int64) << 32) | (0x7FFFFFFF - j).to(tl.int64)


@triton.jit
def _unpack(key):
    o = (key >> 32).to(tl.int32)
    s = (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    j = 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)
    return s, j


@triton.jit
def _largest(x, KP: tl.constexpr, USE_TOPK: tl.constexpr):
    """The KP largest along the last dim, largest first (tl.topk); a full descending sort where Triton has no
    tl.topk. Either way column c holds the (c+1)-th largest."""
    if USE_TOPK:
        return tl.topk(x, KP)
    else:
        return tl.sort(x, descending=True)


@triton.jit
def _sorted_candidates(SC, CNT, r0, BS: tl.constexpr, CAP: tl.constexpr, KP: tl.constexpr,
                       USE_TOPK: tl.constexpr):
    """Rows r0..r0+BS-1 of the scratch: their candidates as packed keys, largest first (empty slots = SENT)."""
    rl = r0 + tl.arange(0, BS)
    cnt = tl.load(CNT + rl)
    cols = tl.arange(0, CAP)
    m = cols[None, :] < tl.minimum(cnt, CAP)[:, None]
    o = (rl[:, None] * CAP + cols[None, :]) * 2
    s = tl.load(SC + o, mask=m, other=0).to(tl.float32, bitcast=True)
    j = tl.load(SC + o + 1, mask=m, other=0)
    return _largest(tl.where(m, _pack(s, j), SENT), KP, USE_TOPK)


@triton.jit
def _fwd_kernel(Q, K, KPM, P, I, SC, CNT, TS, TJ, T, S, H, DK, off, scale, n_tiles, NM,
                sqb, sqh, sqt, skb, skh, skt, smb,
                KK: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAP: tl.constexpr,
                BS: tl.constexpr, DP: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PREC: tl.constexpr,
                USE_TOPK: tl.constexpr, W: tl.constexpr, GW: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
                STOP: tl.constexpr):
    """Stores P and I (and scratch). W, GW: widths of the sorted candidates and group maxima (KP with tl.topk,
    else CAP and BN). STOP != 0 only for the timing breakdown of bench/check_topk_gpu.py: 1 stops after the
    group maxima, 2 after the candidates, 3 = everything (then _out_kernel is skipped)."""
    pid = tl.program_id(0)
    # this program's scratch: BM rows of CAP candidates (score bits, key), counts and thresholds
    SC += pid.to(tl.int64) * BM * CAP * 2
    CNT += pid * BM
    TS += pid * BM
    TJ += pid * BM
    rl = tl.arange(0, BM)
    cb = tl.arange(0, BN)
    U = (cb[:, None] <= cb[None, :]).to(tl.bfloat16)  # c @ U = inclusive prefix count along a row
    for t in range(pid, n_tiles, tl.num_programs(0)):
        bh = t // NM
        m0 = (NM - 1 - t % NM) * BM  # longest (causal) rows first
        rows, rmask, q, Kb, KPMb, n_end = _row_tile(Q, K, KPM, bh // H, bh % H, m0, T, S, DK, off, sqb, sqh, sqt,
                                                    skb, skh, smb, BM, DP, CAUSAL, UPCAST)
        PI = bh.to(tl.int64) * T * KK  # P and I are contiguous (B, H, T, KK)

        # 1. group maxima -> tau = k-th largest of them (a lower bound of the k-th largest score)
        g = tl.full([BM, BN], NEG, tl.float32)
        for n0 in range(0, n_end, BN):
            s = _scores(q, Kb, KPMb, rows, n0, m0, off, S, DK, skt, BN, DP, CAUSAL, HAS_PAD, PREC, UPCAST)
            g = tl.maximum(g, s)
        gs = _largest(g, KP, USE_TOPK)
        cg = tl.arange(0, GW)
        tau = tl.sum(tl.where(cg[None, :] == KK - 1, gs, 0.0), 1)
        top = tl.max(gs, 1)
        # fewer than k non-empty groups: every visible key is a candidate (-FLT_MAX keeps -inf out)
        ts = tl.where(tau > NEG, tau - (tl.abs(tau) + tl.abs(top)) * 0.000244140625, -3.4028234663852886e38)
        tj = tl.full([BM], 0x7FFFFFFF, tl.int32)
        tl.store(TS + rl, ts)
        tl.store(TJ + rl, tj)
        if STOP != 1:
            # 2. candidates; while some row overflows its CAP slots, raise its threshold to the k-th largest stored
            # candidate and sweep again, comparing (score, -key) so that ties cannot stall it. One loop, so the
            # first and the repeated sweeps are the same code (same score bits).
            lex = pid * 0
            go = pid * 0 + 1
            while go > 0:
                cnt = _candidates(q, Kb, KPMb, SC, U, ts, tj, lex, rows, rl, m0, n_end, off, S, DK, skt,
                                  BM, BN, CAP, DP, CAUSAL, HAS_PAD, PREC, UPCAST, FAST)
                tl.store(CNT + rl, cnt)
                go = tl.max(((cnt > CAP) & rmask).to(tl.int32), 0)
                tl.debug_barrier()
                if go > 0:
                    for r0 in range(0, BM, BS):
                        keys = _sorted_candidates(SC, CNT, r0, BS, CAP, KP, USE_TOPK)
                        cw = tl.arange(0, W)
                        ns, nj = _unpack(tl.sum(tl.where(cw[None, :] == KK - 1, keys, 0), 1))
                        r = r0 + tl.arange(0, BS)
                        up = tl.load(CNT + r) > CAP
                        tl.store(TS + r, ns, mask=up)
                        tl.store(TJ + r, nj, mask=up)
                    tl.debug_barrier()
                    ts = tl.load(TS + rl)
                    tj = tl.load(TJ + rl)
                    lex = go
            if STOP != 2:
                # 3. per BS rows: sort the candidates, softmax the top k, store P and I
                for r0 in range(0, BM, BS):
                    keys = _sorted_candidates(SC, CNT, r0, BS, CAP, KP, USE_TOPK)
                    cw = tl.arange(0, W)
                    rs = m0 + r0 + tl.arange(0, BS)
                    live = (keys != SENT) & (cw[None, :] < KK)
                    sc, jj = _unpack(keys)
                    z = sc * scale
                    mx = tl.max(tl.where(live, z, NEG), 1)
                    e = tl.where(live, tl.exp(z - mx[:, None]), 0.0)
                    den = tl.sum(e, 1)
                    p = e / tl.where(den > 0, den, 1.0)[:, None]
                    o2 = PI + rs[:, None] * KK + cw[None, :]
                    sm = (rs[:, None] < T) & (cw[None, :] < KK)
                    tl.store(P + o2, p, mask=sm)
                    tl.store(I + o2, tl.where(live, jj, -1), mask=sm)
        tl.debug_barrier()  # the next tile reuses the scratch


@triton.jit
def _out_kernel(V, P, I, O, T, H, DV, svb, svh, svt, sob, soh, sot,
                KK: tl.constexpr, BMG: tl.constexpr, KC: tl.constexpr, DVP: tl.constexpr):
    """out_i = sum_j P_ij v_j over the k selected keys of BMG query rows."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BMG + tl.arange(0, BMG)
    rmask = rows < T
    dv = tl.arange(0, DVP)
    Vb = V + b.to(tl.int64) * svb + h * svh
    PI = bh.to(tl.int64) * T * KK
    acc = tl.zeros([BMG, DVP], dtype=tl.float32)
    for c0 in range(0, KK, KC):
        cs = c0 + tl.arange(0, KC)
        lm = rmask[:, None] & (cs[None, :] < KK)
        ii = tl.load(I + PI + rows[:, None] * KK + cs[None, :], mask=lm, other=-1)
        pp = tl.load(P + PI + rows[:, None] * KK + cs[None, :], mask=lm, other=0.0)
        vv = tl.load(Vb + ii[:, :, None] * svt + dv[None, None, :],
                     mask=(ii[:, :, None] >= 0) & (dv[None, None, :] < DV), other=0.0)
        acc += tl.sum(pp[:, :, None] * vv.to(tl.float32), 1)
    tl.store(O + b.to(tl.int64) * sob + h * soh + rows[:, None] * sot + dv[None, :], acc.to(O.dtype.element_ty),
             mask=rmask[:, None] & (dv[None, :] < DV))


@triton.jit
def _bwd_kernel(Q, K, V, O, DO, P, I, DQ, DK_, DV_, T, S, H, DK, DV, scale, qk2,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdb, sdh, sdt,
                KK: tl.constexpr, BMB: tl.constexpr, KC: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                FROM_LSE: tl.constexpr):
    """dQ for BMB query rows; dK, dV (float32, contiguous (B, H, S, DK / DV)) by atomic adds into the k selected
    key rows of each query. FROM_LSE: P holds each row's base-2 log-sum-exp (B, H, T) instead of its weights
    (threshold.py's forward), and the weights are exp2(q . k_j * qk2 - lse) of the gathered keys."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BMB + tl.arange(0, BMB)
    rmask = rows < T
    cd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    mq = rmask[:, None] & (cd[None, :] < DK)
    mv = rmask[:, None] & (dv[None, :] < DV)
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqt + cd[None, :], mask=mq, other=0.0)
    q = q.to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * sdb + h * sdh + rows[:, None] * sdt + dv[None, :], mask=mv, other=0.0)
    do = do.to(tl.float32)
    o = tl.load(O + b.to(tl.int64) * sob + h * soh + rows[:, None] * sot + dv[None, :], mask=mv, other=0.0)
    delta = tl.sum(do * o.to(tl.float32), 1)
    Kb = K + b.to(tl.int64) * skb + h * skh
    Vb = V + b.to(tl.int64) * svb + h * svh
    DK_ += bh.to(tl.int64) * S * DK
    DV_ += bh.to(tl.int64) * S * DV
    dq = tl.zeros([BMB, DP], dtype=tl.float32)
    PI = bh.to(tl.int64) * T * KK
    if FROM_LSE:
        lse = tl.load(P + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    for c0 in range(0, KK, KC):
        cs = c0 + tl.arange(0, KC)
        lm = rmask[:, None] & (cs[None, :] < KK)
        ii = tl.load(I + PI + rows[:, None] * KK + cs[None, :], mask=lm, other=-1)
        ok = ii >= 0
        kj = tl.load(Kb + ii[:, :, None] * skt + cd[None, None, :],
                     mask=ok[:, :, None] & (cd[None, None, :] < DK), other=0.0).to(tl.float32)
        if FROM_LSE:
            pp = tl.where(ok, tl.exp2(tl.sum(q[:, None, :] * kj, 2) * qk2 - lse[:, None]), 0.0)
        else:
            pp = tl.load(P + PI + rows[:, None] * KK + cs[None, :], mask=lm, other=0.0)
        vj = tl.load(Vb + ii[:, :, None] * svt + dv[None, None, :],
                     mask=ok[:, :, None] & (dv[None, None, :] < DV), other=0.0).to(tl.float32)
        dp = tl.sum(do[:, None, :] * vj, 2)
        ds = pp * (dp - delta[:, None]) * scale
        dq += tl.sum(ds[:, :, None] * kj, 1)
        tl.atomic_add(DK_ + ii[:, :, None] * DK + cd[None, None, :], ds[:, :, None] * q[:, None, :],
                      mask=ok[:, :, None] & (cd[None, None, :] < DK), sem="relaxed")
        tl.atomic_add(DV_ + ii[:, :, None] * DV + dv[None, None, :], pp[:, :, None] * do[:, None, :],
                      mask=ok[:, :, None] & (dv[None, None, :] < DV), sem="relaxed")
    tl.store(DQ + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqt + cd[None, :], dq.to(DQ.dtype.element_ty),
             mask=mq)


def _pow2(n, lo=16):
    return max(lo, triton.next_power_of_2(n))


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter runs programs one after another; 2 still exercises the persistent loop


def topk_fwd(q, k, v, topk, causal, key_padding_mask, scale):
    """q (B, H, T, d), k (B, H, S, d), v (B, H, S, dv), contiguous; 1 <= topk <= MAX_TOPK (already min(topk, S)).
    Returns out (B, H, T, dv) in q's dtype, P (B, H, T, topk) float32 softmax weights, I (B, H, T, topk) int32 key
    indices (-1 for an empty slot: a row with fewer than topk visible keys)."""
    B, H, T, DK = q.shape
    S, DV = k.shape[2], v.shape[3]
    KP = triton.next_power_of_2(topk)
    # BN >= k (groups >= k, or tau would not exist); BM and stages shrink until the tiles fit the device
    fit = fit_topk(DK, KP, q.element_size(), smem_limit(q.device), BM=CONFIG["BM"], BN=CONFIG["BN"],
                   stages=CONFIG["fwd_stages"])
    BM, BN, BS = fit["BM"], fit["BN"], CONFIG["BS"]
    CAP = max(CONFIG["CAP"], 2 * KP)           # > k so a refinement always makes progress
    BS = min(BS, BM, max(1, 4096 // CAP))      # the sort holds BS x CAP int64 keys in registers
    NM = triton.cdiv(T, BM)
    n_tiles = NM * B * H
    nprog = max(1, min(n_tiles, _num_sms(q.device) * CONFIG["progs_per_sm"]))
    dev = q.device
    out = torch.empty(B, H, T, DV, dtype=q.dtype, device=dev)
    P = torch.empty(B, H, T, topk, dtype=torch.float32, device=dev)
    I = torch.empty(B, H, T, topk, dtype=torch.int32, device=dev)
    SC = torch.empty(nprog * BM * CAP * 2, dtype=torch.int32, device=dev)
    CNT = torch.empty(nprog * BM, dtype=torch.int32, device=dev)
    TS = torch.empty(nprog * BM, dtype=torch.float32, device=dev)
    TJ = torch.empty(nprog * BM, dtype=torch.int32, device=dev)
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.int8).contiguous()
    else:
        kpm = torch.empty(1, 1, dtype=torch.int8, device=dev)
    # fp32 inputs: exact fp32 dots (tf32 would move the selection); bf16/fp16 dots ignore the precision
    upcast = q.dtype == torch.bfloat16 and not q.is_cuda
    prec = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    stop = CONFIG.get("stop", 0)  # timing breakdown only (bench/check_topk_gpu.py)
    _fwd_kernel[(nprog,)](
        q, k, kpm, P, I, SC, CNT, TS, TJ, T, S, H, DK, S - T, scale, n_tiles, NM,
        *q.stride()[:3], *k.stride()[:3], kpm.stride(0),
        KK=topk, KP=KP, BM=BM, BN=BN, CAP=CAP, BS=BS, DP=_pow2(DK), CAUSAL=causal,
        HAS_PAD=key_padding_mask is not None, PREC=prec, UPCAST=upcast, USE_TOPK=HAS_TOPK,
        W=KP if HAS_TOPK else CAP, GW=KP if HAS_TOPK else BN, FAST=q.is_cuda and CONFIG["fast"], STOP=stop,
        num_warps=CONFIG["fwd_warps"], num_stages=fit["stages"])
    if stop == 0:
        _out_kernel[(triton.cdiv(T, CONFIG["BMG"]), B * H)](
            v, P, I, out, T, H, DV, *v.stride()[:3], *out.stride()[:3],
            KK=topk, BMG=CONFIG["BMG"], KC=min(CONFIG["KC"], KP), DVP=_pow2(DV, 1), num_warps=CONFIG["out_warps"])
    return out, P, I


def topk_bwd(q, k, v, out, dout, P, I, scale):
    """Gradients of topk_fwd's output, or of threshold_fwd's from its I and log-sum-exp (P (B, H, T): the weights
    are then recomputed from the gathered keys). dq, dk, dv in the dtypes and layouts of q, k, v (any strides with
    a unit last one, as out and dout); dk, dv accumulated in float32."""
    B, H, T, DK = q.shape
    S, DV = k.shape[2], v.shape[3]
    topk = I.shape[-1]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dq = torch.empty_like(q)
    dk = torch.zeros(B, H, S, DK, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B, H, S, DV, dtype=torch.float32, device=q.device)
    BMB = CONFIG["BMB"]
    _bwd_kernel[(triton.cdiv(T, BMB), B * H)](
        q, k, v, out, dout, P, I, dq, dk, dv, T, S, H, DK, DV, scale, scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *dout.stride()[:3],
        KK=topk, BMB=BMB, KC=min(CONFIG["KC"], triton.next_power_of_2(topk)), DP=_pow2(DK, 1),
        DVP=_pow2(DV, 1), FROM_LSE=P.dim() == 3, num_warps=CONFIG["bwd_warps"])
    return dq, torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv)
