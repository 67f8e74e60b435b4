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
