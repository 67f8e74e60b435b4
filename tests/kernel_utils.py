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
