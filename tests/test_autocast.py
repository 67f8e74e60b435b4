"""Precision under torch.autocast (issue #11): the attention ops receive their inputs in the autocast dtype (bf16),
not the float32 that softmax / LayerNorm / Performer's features hand them, and the results match float32 within
bf16 tolerance. CPU autocast stands in for CUDA's (the same dispatch in kernels/__init__.op_inputs)."""
import pytest
import torch

pytest.importorskip("triton")

import attnlab.kernels.linear_attn.function as lin_fn  # noqa: E402
import attnlab.kernels.memsizer.function as ms_fn  # noqa: E402
import attnlab.kernels.topk_attn as topk_pkg  # noqa: E402
from attnlab.attention import build_attention  # noqa: E402
from kernel_utils import rel  # noqa: E402

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)
VARIANTS = {  # config, the function the op hands its inputs to on the Triton path (interpreter on the CPU)
    "linear": ({"name": "linear", "backend": "triton"}, lin_fn, "linear_attention_triton"),
    "performer": ({"name": "performer", "backend": "triton", "nb_features": 16}, lin_fn, "linear_attention_triton"),
    "memsizer": ({"name": "memsizer", "backend": "triton", "k": 4}, ms_fn, "memsizer_triton"),
    "topk": ({"name": "topk", "backend": "torch", "k": 4}, topk_pkg, "topk_attention_chunked"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_op_gets_bf16_under_autocast(name, monkeypatch):
    cfg, mod, fn = VARIANTS[name]
    seen = []
    real = getattr(mod, fn)

    def spy(*args, **kwargs):
        seen.append(tuple(a.dtype for a in args[:3]))
        return real(*args, **kwargs)
    monkeypatch.setattr(mod, fn, spy)
    torch.manual_seed(0)
    attn = build_attention(cfg, "decoder", 16, 2)
    x = torch.randn(2, 9, 16)
    with BF16:
        y = attn(x)
    assert seen == [(torch.bfloat16,) * 3], seen
    assert y.dtype == torch.bfloat16  # the output projection ran in bf16: nothing went back to float32 first
    seen.clear()
    y32 = attn(x)  # without autocast: float32 in, float32 out
    assert seen == [(torch.float32,) * 3] and y32.dtype == torch.float32


@pytest.mark.parametrize("name", ["linear", "memsizer", "performer", "topk"])
def test_autocast_matches_float32(name):
    """Forward and input gradient under autocast(bf16), PyTorch path, within bf16 tolerance of float32."""
    cfg = {**VARIANTS[name][0], "backend": "torch"}
    if name == "topk":  # k >= the keys: bf16 rounding cannot flip which keys are selected (a different function)
        cfg["k"] = 128
    torch.manual_seed(1)
    attn = build_attention(cfg, "decoder", 32, 4)
    x = torch.randn(2, 70, 32, requires_grad=True)
    dy = torch.randn(2, 70, 32)
    y32 = attn(x)
    g32, = torch.autograd.grad(y32, x, dy)
    with BF16:
        y = attn(x)
    g, = torch.autograd.grad(y, x, dy)
    assert rel(y, y32) < 3e-2 and rel(g, g32) < 5e-2, (rel(y, y32), rel(g, g32))


def test_torch_path_keeps_float32_state():
    """bf16 inputs on the PyTorch path: the running state and normalizer are float32 (the result is as close to
    the float64 reference as the bf16 inputs allow, even over a long causal prefix), the output is bf16."""
    from attnlab.kernels.linear_attn import linear_attention
    from attnlab.kernels.linear_attn.reference import linear_attention_ref
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 2048, 8, generator=g).bfloat16() for _ in range(3))
    y = linear_attention(q, k, v, backend="torch")
    ref = linear_attention_ref(q.double(), k.double(), v.double())
    assert y.dtype == torch.bfloat16 and rel(y, ref) < 5e-3, rel(y, ref)
