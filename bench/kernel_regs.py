"""Registers, spills and shared memory of the top-k threshold kernels compiled for sm_90a, on the CPU (no GPU):
each kernel as a bf16 call (d = 64, k = 64, causal) launches it, recorded in Triton's interpreter, then compiled
by Triton for sm_90 and assembled by the ptxas that ships with Triton. The numbers in kernels/topk_attn/NOTES.md
("offline ptxas") come from here.

    python bench/kernel_regs.py                                   # the default CONFIG
    python bench/kernel_regs.py '{"BN": 128, "sel_warps": 8}'    # threshold.CONFIG overrides
"""
from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # record the launches on the CPU (the compile runs in a child without it)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import pytest  # noqa: E402
import torch  # noqa: E402

import attnlab.kernels.topk_attn.function as function  # noqa: E402
import attnlab.kernels.topk_attn.threshold as threshold  # noqa: E402
from kernel_utils import as_on_gpu, compile_for_sm90, record_launches  # noqa: E402


def main():
    threshold.CONFIG.update(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
    mp = pytest.MonkeyPatch()
    mp.setattr(function, "THRESHOLD_MAX_T", 1 << 62)
    launches = record_launches(mp)
    q, k, v = (torch.randn(1, 1, 130, 64, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    function.topk_attention_triton(q, k, v, 64, True).float().sum().backward()
    mp.undo()
    print(f"threshold.CONFIG = {threshold.CONFIG}")
    print(compile_for_sm90(as_on_gpu(launches), report=True).replace("REPORT ", ""), end="")


if __name__ == "__main__":
    main()
