"""Shared by the Triton kernel tests (which run in Triton's interpreter on the CPU; see conftest.py)."""
import torch

# relative L2 error allowed against a float64 reference, by input dtype
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
