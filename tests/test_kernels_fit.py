"""Block-size fitting (kernels/fit.py): pure functions of the shapes and the device's shared-memory limit, so the
whole config grid of issue #11 is checked here on the CPU; bench/check_fit_gpu.py compiles the same grid on a GPU
and compares the estimate with what the compiler really allocates."""
import functools
import itertools
import zlib

import pytest
import torch

pytest.importorskip("triton")

import attnlab.kernels.linear_attn.chunk as chunk  # noqa: E402
from attnlab.kernels import fit  # noqa: E402
from attnlab.kernels.linear_attn.reference import linear_attention_ref  # noqa: E402
from kernel_utils import rel  # noqa: E402

H200 = 232448  # bytes, what the H200 reported in the crash of issue #11
LIMITS = (H200, 166912, 101376)  # Hopper, A100, consumer Ampere / Ada
WIDTHS, SLOTS, HEADS = (64, 128, 256, 512, 1024), (4, 8, 16, 32, 64), (1, 2, 4, 8, 16)


def test_the_h200_crash_config_is_refitted():
    """MemSizer, copy setup: d=256, k=4 slots, float32 inputs. The old choice (dv-tile 256) is over the limit
    by the estimate, the fitted one is under it for every kernel of both groups."""
    assert fit.chunk_smem("fwd", 64, 16, 256, 4, 2) > H200
    for group in chunk.GROUPS.values():
        cfg = fit.fit_chunk(group, 4, 256, 4, H200)
        assert cfg["BV"] < 256
        assert cfg["BT"] == 64 and all(fit.chunk_smem(kern, 64, cfg["BK"], cfg["BV"], 4, cfg["stages"]) <= H200 for kern in group)


@pytest.mark.parametrize("smem", LIMITS)
def test_every_grid_shape_fits_or_says_so(smem):
    """Linear attention (head width d / heads) and MemSizer (k slots x model width d), fp32 and bf16: a config
    that fits the limit (shared memory and the state's register budget), a power-of-two tile >= 16, stages >= 2;
    head widths over 256 are refused (NoFit)."""
    for d, k, h, nbytes in itertools.product(WIDTHS, SLOTS, HEADS, (2, 4)):
        for DK, DV in ((d // h, d // h), (k, d)):
            for group in chunk.GROUPS.values():
                if DK > 256:  # the kernels' limit: the dispatchers take the PyTorch path
                    with pytest.raises(fit.NoFit, match="head dim"):
                        fit.fit_chunk(group, DK, DV, nbytes, smem)
                    continue
                try:
                    cfg = fit.fit_chunk(group, DK, DV, nbytes, smem)
                except fit.NoFit:
                    assert smem < H200, (group, DK, DV, nbytes)  # everything fits a Hopper (d=256 fp32: 32-row chunks)
                    continue
                BK, BV = cfg["BK"], cfg["BV"]
                assert fit.MIN_BV[nbytes] <= BV <= fit.MAX_BV and BV & (BV - 1) == 0  # tiles seen right on GPU
                assert BK >= max(DK, fit.MIN_BK[nbytes]) and cfg["stages"] >= 2
                assert all(fit.chunk_smem(kern, cfg["BT"], BK, BV, nbytes, cfg["stages"]) <= smem for kern in group)
                assert BK * BV // (32 * cfg["warps"]) <= fit.STATE_REGS and cfg["warps"] <= fit.MAX_WARPS


def test_topk_fit_and_nofit():
    for dk, kp, nbytes in itertools.product((4, 16, 64, 128, 256), (1, 16, 64, 128), (2, 4)):
        cfg = fit.fit_topk(dk, kp, nbytes, H200)
        assert cfg["BN"] >= kp and fit.topk_smem(cfg["BM"], cfg["BN"], max(16, dk), nbytes, cfg["stages"]) <= H200
    assert fit.fit_topk(64, 64, 2, H200) == {"BM": 64, "BN": 128, "stages": 2}  # the tuned default, unchanged
    with pytest.raises(fit.NoFit, match="shared memory"):
        fit.fit_topk(256, 128, 4, 60000)
    with pytest.raises(fit.NoFit, match="d=512"):
        fit.fit_chunk(("fwd",), 512, 64, 2, H200)
    assert fit.smem_limit(torch.device("cpu")) == fit.DEFAULT_SMEM


def test_out_of_resources_at_launch_halves_the_tile(monkeypatch):
    """The safety net: if a compiler needs more than the estimate, the launch error caps that group's dv-tile at
    half and the call is retried (same result); the cap is remembered."""
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(chunk, "_BV_CAP", {})
    real, seen = chunk._fwd, []

    def flaky(*args):
        common = args[-2]
        seen.append(common["BV"])
        if common["BV"] > 16:
            raise OutOfResources(300000, H200, "shared memory")
        return real(*args)
    monkeypatch.setattr(chunk, "_fwd", flaky)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 9, 4, generator=g) for _ in range(3))
    v = torch.randn(1, 1, 9, 40, generator=g)
    with pytest.warns(UserWarning, match="retrying with dv-tile"):
        o = chunk.chunk_fwd(q, k, v, causal=True, elu1=True, norm=True)[0]
    assert seen == [64, 32, 16]
    assert rel(o, linear_attention_ref(q.double(), k.double(), v.double())) < 1e-5
    assert list(chunk._BV_CAP.values()) == [16]


def test_smem_limit_is_a_constant_when_compiled(monkeypatch):
    """topk_attention_triton asks for the device's shared memory while torch.compile traces the model: the driver
    query (behind an lru_cache) is a constant to dynamo, not a graph break (one broke the whole-model CUDA graphs:
    host-bound steps, 537k against 657k tokens/s; bench/RESULTS.md, session 11)."""
    @functools.lru_cache(maxsize=None)
    def props(index):  # the driver query as fit._props makes it: a call into a C extension
        return 232448 + index + zlib.crc32(b"")

    monkeypatch.setattr(fit, "_props", props)
    f = torch.compile(lambda x: x + fit.smem_limit(torch.device("cuda", 0)), fullgraph=True, backend="eager")
    assert f(torch.zeros(1)).item() == 232448
