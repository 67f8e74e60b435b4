"""GPU kernels (Triton) for the hot paths, one folder per op, each with its pure-PyTorch reference beside it.

Dispatch: every op takes ``backend`` = ``"auto"`` (Triton on CUDA tensors when Triton imports, the reference
otherwise), ``"triton"`` (force; on CPU tensors this needs ``TRITON_INTERPRET=1``) or ``"torch"`` (the reference).

Precision (``op_inputs``, ``torch_math``): under ``torch.autocast`` the parallel ops take their inputs in the autocast
dtype (bf16 under ``trainer=gpu``) whatever dtype they arrive in: MemSizer's slot distributions (softmax) and
LayerNorm outputs come out of autocast in float32, and would otherwise take the float32 kernels, ~15x slower. What
stays float32: everything the ops accumulate (the d x dv state and the normalizer z of linear attention, MemSizer's
memory and its row scale c^{-1/2}, top-k's softmax weights and the backward's dk/dv sums), inside the kernels or the
PyTorch path; the decode-step states (S, z, count) are float32 tensors the modules own. The output comes back in
the op's input dtype, the autocast dtype, so no copy is made just to be cast again by the next projection.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


_HAS_TRITON = importlib.util.find_spec("triton") is not None  # once: find_spec costs ~0.1 ms, ops ask at every call


def triton_available() -> bool:
    return _HAS_TRITON


def use_triton(backend: str, *tensors) -> bool:
    """Decide whether an op runs its Triton kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but Triton is not installed: `pip install triton`")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
        return True
    return on_cuda and triton_available()


def op_inputs(*tensors):
    """The op's floating inputs in the autocast dtype when autocast is on for their device (float32 / float16 /
    bf16 ones; float64 and integer tensors, and None, pass unchanged); as given otherwise."""
    dev = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    low = torch.get_autocast_dtype(dev)
    return tuple(t.to(low) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
                 for t in tensors)


@contextlib.contextmanager
def torch_math():
    """The PyTorch paths compute in float32 (states and normalizers, see above) with autocast off inside, so that
    autocast does not round their running sums to bf16; callers upcast the inputs and cast the result back."""
    with contextlib.ExitStack() as stack:
        for dev in ("cuda", "cpu"):
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield


def upcast(*tensors):
    """float16 / bf16 tensors as float32 (None and other dtypes unchanged): the PyTorch paths' working precision."""
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


def eager_or_compiled(op, impl, setup_context, backward):
    """How a kernel with autograd is called: the torch.library custom ``op`` while torch.compile traces (it sees
    one opaque op with a fake implementation, so no graph break, and CUDA graphs capture it), else a plain
    ``autograd.Function`` over the same ``impl`` (the op's body), ``setup_context`` and ``backward``.

    Why both: eager models of this size are host-bound (bench/RESULTS.md), and a custom op's dispatch (schema
    handling, the generated autograd wrapper, a second custom op for the backward) cost ~150 us more host time per
    forward + backward than an autograd.Function with the same body (measured in one process on the CPU machine).
    Outputs after the first are saved-for-backward tensors without gradients."""
    def forward(ctx, *inputs):
        out = impl(*inputs)
        setup_context(ctx, inputs, out)
        ctx.mark_non_differentiable(*out[1:])
        ctx.set_materialize_grads(False)  # no zero tensors made for the outputs without gradients
        ctx.n_inputs = len(inputs)
        return out

    def backward_(ctx, *grads):
        return (None,) * ctx.n_inputs if grads[0] is None else backward(ctx, *grads)

    # named after the op (grad_fn: e.g. linear_attn_fwd_eagerBackward)
    Eager = type(impl.__name__.strip("_") + "_eager", (torch.autograd.Function,),
                 {"forward": staticmethod(forward), "backward": staticmethod(backward_)})

    def call(*inputs):
        return op(*inputs) if torch.compiler.is_compiling() else Eager.apply(*inputs)
    return call
