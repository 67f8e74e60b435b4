"""Shared by the Triton kernel tests (which run in Triton's interpreter on the CPU; see conftest.py)."""
import torch

# relative L2 error allowed against a float64 reference, by input dtype
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def serial_mode(monkeypatch, programs):
    """A case's run mode: "serial" / "serial32" force the serial pass (and cap its tiles); else it is kept off.
    Returns (serial, programs, passes): passes lists the directions of the serial passes run (False: forward)."""
    import attnlab.kernels.linear_attn.chunk as chunk
    serial = programs if isinstance(programs, str) else None
    monkeypatch.setitem(chunk.CONFIG, "serial_programs", 1 if serial else 10 ** 9)
    if serial == "serial32":
        monkeypatch.setitem(chunk.CONFIG, "serial_tile", 32)
    passes, real = [], chunk._prefix
    monkeypatch.setattr(chunk, "_prefix", lambda *a, **kw: passes.append(kw["reverse"]) or real(*a, **kw))
    return serial, 0 if serial else programs, passes


def run_id(programs):
    """Test id part of a case's run mode (see serial_mode)."""
    return f"-{programs}" if isinstance(programs, str) else "-runs" if programs else ""


_COMPILE = """
import importlib, json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
module, specs, warps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
m = importlib.import_module(module)
for name, consts, types in specs:
    fn = getattr(m, name)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
    try:
        compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=2))
    except FileNotFoundError as e:  # no ptxas: nothing to say about the kernels
        print("NO-TOOLCHAIN", e)
        sys.exit(0)
"""


def compile_for_sm90(module, specs, warps=8):
    """Compile Triton kernels of ``module`` for an H100/H200 (sm_90) in a fresh process without the interpreter
    (TRITON_INTERPRET=0: real JIT functions; no GPU needed). specs: [(kernel name, constexprs, {arg: type})],
    types as Triton signatures ("*bf16", "fp32"; default "i32"). Returns the child's output if the toolchain is
    missing (the caller skips), None when everything compiled; a compilation error raises with its message."""
    import json
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, module, json.dumps(specs), str(warps)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"{module}: sm_90 compilation failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout if "NO-TOOLCHAIN" in r.stdout else None
