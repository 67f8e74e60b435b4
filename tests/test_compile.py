"""`model.compile=true`: every attention variant under torch.compile gives the eager outputs and gradients.

The backend here is AOT autograd without code generation ("aot_eager"): it traces forward and backward graphs
exactly as inductor does (the part that fails on a stride or a graph break), without a C++ compile per variant."""
from pathlib import Path

import pytest
import torch

from attnlab.transformer import TransformerDecoder, TransformerEncoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("attention", sorted(p.stem for p in (ROOT / "conf/attention").glob("*.yaml")))
def test_compiled_model_equals_eager(compose_cfg, attention):
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(compose_cfg([f"attention={attention}", "logger=none"]).attention, resolve=True)
    decoder = cfg.get("decoder", {}).get("name", cfg["name"]) != "linformer"  # Linformer has no causal form
    torch.manual_seed(0)
    kind = TransformerDecoder if decoder else TransformerEncoder
    net = kind(cfg, vocab_size=11, max_len=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0).double()
    x = torch.randint(0, 11, (2, 17))
    torch.manual_seed(1)  # Reformer draws its hash rotations: the same draw for both
    ref = net(x)
    ref.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch.manual_seed(1)
    out = torch.compile(net, backend="aot_eager")(x)
    out.square().sum().backward()
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert all(torch.allclose(p.grad, g, rtol=1e-9, atol=1e-12) for p, g in zip(net.parameters(), grads))
    torch._dynamo.reset()


@pytest.mark.parametrize("op", ["linear", "memsizer", "topk"])
def test_kernels_are_custom_ops_when_compiled_and_functions_in_eager(op):
    """The Triton ops (here on the interpreter) enter a compiled graph as one torch.library custom op each, forward
    and backward (no graph break, fullgraph=True), and run eagerly through the cheaper autograd.Function: both give
    the same outputs and gradients."""
    pytest.importorskip("triton")
    from attnlab.kernels.linear_attn import linear_attention
    from attnlab.kernels.memsizer import memsizer
    from attnlab.kernels.topk_attn import topk_attention
    g = torch.Generator().manual_seed(0)
    if op == "memsizer":
        inputs = [torch.randn(1, 20, n, generator=g, requires_grad=True) for n in (4, 4, 16)]
        fn = lambda p, a, v: memsizer(p, a, v, True, backend="triton")  # noqa: E731
    else:
        inputs = [torch.randn(1, 2, 20, 8, generator=g, requires_grad=True) for _ in range(3)]
        fn = (lambda q, k, v: linear_attention(q, k, v, backend="triton")) if op == "linear" else \
            (lambda q, k, v: topk_attention(q, k, v, topk=4, causal=True, backend="triton"))
    graphs = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        def keep(g, _):
            graphs.append(str(g.graph))
            return make_boxed_func(g)
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    ref = fn(*inputs)
    ref.square().sum().backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    out = torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    out.square().sum().backward()
    torch._dynamo.reset()
    name = {"linear": "linear_attn", "memsizer": "memsizer", "topk": "topk_threshold"}[op]
    assert len(graphs) == 2 and f"attnlab.{name}_fwd" in graphs[0] and f"attnlab.{name}_bwd" in graphs[1]
    assert ref.grad_fn.name().endswith("_eagerBackward")  # eager: the autograd.Function, not the custom op
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.allclose(t.grad, gr, atol=1e-5) for t, gr in zip(inputs, grads))


def test_model_compile_takes_a_mode_and_names_the_valid_ones(compose_cfg):
    """`model.compile=reduce-overhead` reaches torch.compile as its mode (compiled lazily, at the first step); a
    mode torch does not know fails while the run is built, with torch's list of modes."""
    from attnlab.train import build
    _, model, _ = build(compose_cfg(["logger=none", "model.compile=reduce-overhead"]))
    assert model.net._compiled_call_impl is not None
    _, model, _ = build(compose_cfg(["logger=none"]))
    assert model.net._compiled_call_impl is None
    with pytest.raises(ValueError, match="'reduce_overhead' is not a torch.compile mode.*'reduce-overhead'"):
        build(compose_cfg(["logger=none", "model.compile=reduce_overhead"]))
