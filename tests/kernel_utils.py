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
import importlib, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
specs, report = json.loads(sys.argv[1]), sys.argv[2]
for module, name, consts, types, warps, stages, *rest in specs:  # rest: [aligned args[, maxnreg]]
    aligned = rest[0] if rest else []
    maxnreg = rest[1] if len(rest) > 1 else None
    fn = getattr(importlib.import_module(module), name)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()},
                    attrs=attrs)
    try:
        cap = {"maxnreg": maxnreg} if maxnreg else {}
        c = compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages, **cap))
    except FileNotFoundError as e:  # no ptxas: nothing to say about the kernels
        print("NO-TOOLCHAIN", e)
        sys.exit(0)
    except Exception as e:
        print(f"FAILED {module}.{name} {consts} (num_warps={warps}): {type(e).__name__}: {e}")
        sys.exit(1)
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if report in ("1", "sass"):  # registers and spills as ptxas reports them (the sm_90a assembler shipped with Triton)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, name + ".ptx")
            with open(ptx, "w") as f:
                f.write(c.asm["ptx"])
            for tool in ("ptxas-blackwell", "ptxas"):
                r = subprocess.run([os.path.join(bin_dir, tool), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    break
        info = " ; ".join(ln.split("info    : ")[-1].strip() for ln in r.stderr.splitlines()
                          if "registers" in ln or "spill" in ln or "C7515" in ln)
        print(f"REPORT {name} warps={warps} stages={stages} smem={c.metadata.shared} | {info}")
    if report == "sass":  # the machine code of Triton's own cubin, for bench/kernel_regs.py --sass
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "k.cubin"), "wb") as f:
                f.write(c.asm["cubin"])
            r = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True)
        print(f"SASS-BEGIN {name} warps={warps} stages={stages}\\n{r.stdout}\\nSASS-END")
    print(f"SMEM {name} {c.metadata.shared}")
"""


def compile_for_sm90(specs, report=False):
    """Compile Triton kernels for an H100/H200 (sm_90) in one fresh process without the interpreter
    (TRITON_INTERPRET=0: real JIT functions; no GPU needed). specs: [(module, kernel name, constexprs, {arg: type},
    num_warps, num_stages, [aligned args], maxnreg or None)], types as Triton signatures ("*bf16", "fp32"; default
    "i32"), aligned args: those the JIT specializes as multiples of 16 (ints) or 16-byte aligned (pointers), e.g. from
    record_launches. Returns the child's output (a str) if the toolchain is missing (the caller skips), else
    {kernel name: the most shared memory one of its launches asks for}; a compilation error raises with its
    message. report: return instead one line per kernel with its shared memory and ptxas's registers and spills;
    report="sass": those lines and each kernel's machine code (nvdisasm) between SASS-BEGIN / SASS-END lines
    (bench/kernel_regs.py)."""
    import json
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    mode = {True: "1", False: "0"}.get(report, report)
    r = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(specs), mode], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"sm_90 compilation failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    if report or "NO-TOOLCHAIN" in r.stdout:
        return r.stdout
    return shared_memory(r.stdout)


def shared_memory(report):
    """{kernel name: the most shared memory one of its launches asks for} from compile_for_sm90's output."""
    smem = {}
    for line in report.splitlines():
        if line.startswith("SMEM "):
            _, name, n = line.split()
            smem[name] = max(smem.get(name, 0), int(n))
    return smem


_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.float64": "fp64",
           "torch.int32": "i32", "torch.int64": "i64", "torch.int8": "i8", "torch.uint8": "u8", "torch.bool": "i1"}


def record_launches(monkeypatch):
    """Record every Triton kernel launched from now on (in the interpreter) as a compile_for_sm90 spec, argument
    types and alignment (as the JIT specializes them) read off the real call; returns the list it fills (each
    distinct launch once)."""
    import inspect

    import torch
    from triton.runtime.interpreter import InterpretedFunction
    seen, real = [], InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        params = list(inspect.signature(fn).parameters.values())
        bound = dict(zip([p.name for p in params], args))
        bound.update(kwargs)
        consts, types, aligned = {}, {}, []
        for p in params:
            v = bound.get(p.name, p.default)
            if "constexpr" in str(p.annotation):
                consts[p.name] = v
            elif isinstance(v, torch.Tensor):
                types[p.name] = "*" + _DTYPES[str(v.dtype)]
                aligned += [p.name] * (v.data_ptr() % 16 == 0)
            elif isinstance(v, float):
                types[p.name] = "fp32"
            elif isinstance(v, int) and not isinstance(v, bool):
                types[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                aligned += [p.name] * (v % 16 == 0)
        spec = [fn.__module__, fn.__name__, consts, types, kwargs.get("num_warps", 4), kwargs.get("num_stages", 2),
                aligned, kwargs.get("maxnreg")]
        if spec not in seen:
            seen.append(spec)
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def as_on_gpu(launches):
    """The launches as a GPU makes them from the same call at aligned shapes (T, d and strides multiples of
    16, as in training): tensor-core dots on bf16 tiles (the interpreter's bf16 dot is wrong, so there the top-k
    kernels upcast to float32 with exact 'ieee' dots (UPCAST) and the chunk kernels dot bf16-rounded float32
    (LOWP 2): variants no GPU runs); the GPU-only paths of the top-k kernels: FAST on; every pointer and int
    argument aligned (the variant with vector loads and pipelined copies, which asks for the most shared memory)."""
    for spec in launches:
        if spec[2].get("LOWP") == 2:  # the linear-attention / MemSizer chunk kernels on bf16 inputs
            spec[2]["LOWP"] = 1
        if "UPCAST" in spec[2]:  # float32 inputs keep their exact 'ieee' dots
            spec[2].update(UPCAST=False, PREC="ieee" if "fp32" in spec[3].get("Q", "") else "tf32")
        if "FAST" in spec[2]:  # inline-PTX stores, the threshold forward's mask dot on bf16 tiles
            spec[2]["FAST"] = True
        spec[6] = [n for n, t in spec[3].items() if not t.startswith("fp")]
    return launches
