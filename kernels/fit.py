"""Block sizes that fit the GPU a kernel runs on: shared memory and registers, as pure functions of the shapes.

Why: the chunk kernels once chose their dv-tile from the head width alone. On an H200 MemSizer's copy setup (d=256,
k=4 slots, float32 inputs under autocast) then asked for 241920 bytes of shared memory against a 232448-byte limit
and crashed at launch. Here every launch picks its tile sizes, warps and pipeline stages from

* an upper estimate of the kernel's shared memory: each tile loaded inside the chunk loop is buffered once per
  pipeline stage, each register tile that feeds a tensor-core dot (the state, the score tile) is staged once, and
  one float32 tile of the output is allowed for layout conversions. Triton reuses some of that, so the true use is
  lower (bench/check_fit_gpu.py prints both for the whole grid); the estimate only has to stay above it;
* the register budget of the float32 state carried in registers: at most STATE_REGS 32-bit registers per thread,
  so a wide d x dv state gets more warps or a narrower dv-tile rather than spilling;
* the device's own limit (``smem_limit``), read from the driver.

The search shrinks in the order that costs least: first the dv-tile (more programs, a few partial sums), then the
chunk length (64 -> 32 rows, only a 256-wide float32 head needs it), never below two pipeline stages for the chunk kernels (one stage crashed with an illegal address on
Triton 3.6, kernels/NOTES.md). Nothing fitting raises ``NoFit``; the dispatchers then take the PyTorch path.
Launchers also keep a safety net (``shrink_on_oor``) in case a compiler version needs more than the estimate.
"""
from __future__ import annotations

import functools

import torch

# Hopper (H100 / H200): 227 KiB of opt-in shared memory per block. Used where no device can be asked (the CPU
# interpreter), so the interpreter tests exercise the same choices as an H100.
DEFAULT_SMEM = 232448
STATE_REGS = 64          # float32 state registers per thread we accept before adding warps / narrowing the tile
MAX_WARPS = 8
# Tiles seen wrong on an H200 with Triton 3.6 (bench/check_fit_gpu.py, two sweeps on 2026-12-01; cause not
# established, the shared memory fitted): with bf16 inputs and a 16-wide key tile (BK=16: head / slot widths <= 16)
# causal calls hit illegal memory accesses or returned wrong gradients at dv-tiles 32, 128 and 256 (MemSizer k=4/8/16
# with d >= 128, linear attention d=4/8/16), and a 16-wide dv-tile on a 256-wide bf16 head gave wrong dk/dv. Every
# bf16 configuration with BK >= 32 and a dv-tile of 32..128 was right. So 16-bit inputs get BK >= 32 (the padded
# key columns are masked, as for any width that is not a power of two) and dv-tiles in [32, 128]. The BK=32 rule
# for widths <= 16 is inferred from those sweeps, not yet re-run on the GPU.
MAX_BV = 128
MIN_BV = {2: 32, 4: 16}
MIN_BK = {2: 32, 4: 16}


class NoFit(ValueError):
    """No block configuration of a kernel fits the device; the caller uses the PyTorch path."""


@functools.lru_cache(maxsize=None)
def _props(index: int) -> int:
    try:
        import triton
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # no driver (interpreter) or an older Triton: ask torch
        p = torch.cuda.get_device_properties(index)
        return int(getattr(p, "shared_memory_per_block_optin", DEFAULT_SMEM))


@torch.compiler.assume_constant_result
def smem_limit(device) -> int:
    """Shared memory per block (bytes, opt-in maximum) of ``device``; DEFAULT_SMEM off the GPU. A constant to
    torch.compile (topk_attention_triton asks while a model is traced; the driver call would break the graph)."""
    if getattr(device, "type", "cpu") != "cuda":
        return DEFAULT_SMEM
    return _props(device.index if device.index is not None else torch.cuda.current_device())


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


# Tiles of each chunk kernel as (rows, cols, kind): kind "load" is read from memory inside the loop (buffered per
# stage, input dtype), "dot" a register tile staged for a tensor-core operand (dot dtype), "f32" a float32 tile.
def chunk_tiles(kernel: str, BT: int, BK: int, BV: int) -> list[tuple[int, int, str]]:
    if kernel == "state":
        return [(BK, BT, "load"), (BT, BV, "load")]
    if kernel == "prefix":  # X^T, Y and (backward) y loads; the state and the weight columns (_wcols) as operands
        return [(BK, BT, "load"), (BT, BV, "load"), (BT, BV, "load"), (BK, BV, "dot"), (BT, BV, "dot")]
    if kernel == "fwd":
        return [(BT, BK, "load"), (BK, BT, "load"), (BT, BV, "load"), (BK, BV, "dot"), (BT, BT, "dot"),
                (BT, BV, "f32")]
    if kernel == "bwd_q":   # do, o, q, k, v^T loads; S^T, G, R-accumulation operands; dq
        return [(BT, BV, "load"), (BT, BV, "load"), (BT, BK, "load"), (BT, BK, "load"), (BV, BT, "load"),
                (BV, BK, "dot"), (BT, BT, "dot"), (BT, BV, "dot"), (BT, BK, "f32")]
    if kernel == "bwd_kv":  # k, v, q, do loads; R, R^T, A^T, G^T operands; dk, dv
        return [(BT, BK, "load"), (BT, BV, "load"), (BT, BK, "load"), (BT, BV, "load"),
                (BK, BV, "dot"), (BV, BK, "dot"), (BT, BT, "dot"), (BT, BT, "dot"), (BT, BV, "f32")]
    if kernel == "bwd_chunk":  # q, k, v, do loads; S^T, R, A^T, G operands; dq, dk, dv
        return [(BT, BK, "load"), (BT, BK, "load"), (BT, BV, "load"), (BT, BV, "load"),
                (BK, BV, "dot"), (BK, BV, "dot"), (BT, BT, "dot"), (BT, BT, "dot"), (BT, BV, "f32")]
    raise ValueError(f"unknown chunk kernel {kernel!r}")


def chunk_smem(kernel: str, BT: int, BK: int, BV: int, in_bytes: int, stages: int) -> int:
    """Upper estimate of a chunk kernel's shared memory in bytes (see the module docstring)."""
    dot_bytes = 2 if in_bytes == 2 else 4
    total = 0
    for r, c, kind in chunk_tiles(kernel, BT, BK, BV):
        total += r * c * (in_bytes * stages if kind == "load" else dot_bytes if kind == "dot" else 4)
    return total


@functools.lru_cache(maxsize=4096)  # called at every launch: keep the search off the host's hot path
def fit_chunk(kernels: tuple[str, ...], DK: int, DV: int, in_bytes: int, smem: int, *, BT: tuple = (64, 32),
              BV_pref: int = 64, state: int = 4096, warps: int = 4, stages: int = 2,
              bv_cap: int | None = None) -> dict:
    """Tile sizes for a group of chunk kernels launched together (they share BV, so the same dv-tiling):
    returns {"BT", "BK", "BV", "warps", "stages"}. ``BT``: the chunk lengths to try, in order (the forward and
    backward must agree on it when a causal sequence is split into runs, so callers fix it for both groups).
    Cached: the returned dict is shared, do not modify it. ``BV_pref`` / ``state``: the preferred dv-tile and the largest
    BK x BV state (a narrow d gets a wider tile, as before); ``bv_cap``: an upper bound learned at run time."""
    if DK > 256:
        raise NoFit(f"head dim d={DK} > 256")
    BK = max(_p2(DK), MIN_BK.get(in_bytes, 16))
    for bt in BT:  # a shorter chunk only when no dv-tile fits (a 256-wide float32 head)
        BV = max(min(_p2(DV), max(BV_pref, state // BK), MAX_BV), MIN_BV.get(in_bytes, 16))
        if bv_cap:
            BV = min(BV, bv_cap)
        while BV >= MIN_BV.get(in_bytes, 16) or (BV >= 16 and bv_cap):
            if all(chunk_smem(k, bt, BK, BV, in_bytes, stages) <= smem for k in kernels):
                w = warps
                while BK * BV // (32 * w) > STATE_REGS and w < MAX_WARPS:
                    w *= 2
                if BK * BV // (32 * w) <= STATE_REGS:
                    return {"BT": bt, "BK": BK, "BV": BV, "warps": w, "stages": stages}
            BV //= 2
    raise NoFit(f"chunk kernels {kernels}: no dv-tile fits d={DK}, dv={DV}, {in_bytes}-byte inputs in "
                f"{smem} bytes of shared memory")


def topk_smem(BM: int, BN: int, DP: int, in_bytes: int, stages: int) -> int:
    """Upper estimate of the top-k forward kernel's shared memory: the key tile per stage, the query tile, the
    float32 score tile, the bf16 BN x BN prefix-count operand and its BM x BN counts."""
    return BN * DP * in_bytes * stages + BM * DP * in_bytes + BM * BN * 4 + BN * BN * 2 + BM * BN * 2


def fit_topk(DK: int, KP: int, in_bytes: int, smem: int, *, BM: int = 64, BN: int = 128, stages: int = 2) -> dict:
    """{"BM", "BN", "stages"} for the top-k forward: fewer query rows first, then one pipeline stage. BN stays
    >= the power of two of k (the group maxima need at least k groups)."""
    DP, BN = _p2(DK), max(BN, KP)
    for st in sorted({stages, 1}, reverse=True):
        bm = BM
        while bm >= 16:
            if topk_smem(bm, BN, DP, in_bytes, st) <= smem:
                return {"BM": bm, "BN": BN, "stages": st}
            bm //= 2
    raise NoFit(f"top-k forward: d={DK}, k={KP}, {in_bytes}-byte inputs do not fit {smem} bytes of shared memory")


def reg_cap(config: dict, kernel: str, x: torch.Tensor) -> dict:
    """Launch options capping a kernel's registers at config[kernel + "_maxnreg"], for 2-byte inputs only (the
    caps were measured on bf16; float32 tiles take twice the registers and would spill)."""
    n = config.get(kernel + "_maxnreg")
    return {"maxnreg": n} if n and x.element_size() == 2 else {}


def is_oor(err: BaseException) -> bool:
    """Triton's 'out of resource' launch error (shared memory or registers), any version."""
    return type(err).__name__ == "OutOfResources" or "out of resource" in str(err).lower()
