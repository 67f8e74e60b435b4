"""Registers, spills and shared memory of the top-k threshold kernels compiled for sm_90a, on the CPU (no GPU):
each kernel as a bf16 call (d = 64, k = 64, causal) launches it, recorded in Triton's interpreter, then compiled
by Triton for sm_90 and assembled by the ptxas that ships with Triton. The numbers in kernels/topk_attn/NOTES.md
("offline ptxas") come from here.

    python bench/kernel_regs.py                                   # the default CONFIG
    python bench/kernel_regs.py '{"BN": 128, "sel_warps": 8}'    # threshold.CONFIG overrides
    python bench/kernel_regs.py --sass                            # + instructions per loop, by opcode

--sass counts the machine instructions of each loop body (a backward branch) of Triton's own cubin, the code
inside and outside branches alike: how session 11 found the forward's packed boolean masks (3947 instructions per
key tile against 1753 without; kernels/topk_attn/NOTES.md).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

os.environ["TRITON_INTERPRET"] = "1"  # record the launches on the CPU (the compile runs in a child without it)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import pytest  # noqa: E402
import torch  # noqa: E402

import attnlab.kernels.topk_attn.function as function  # noqa: E402
import attnlab.kernels.topk_attn.threshold as threshold  # noqa: E402
from kernel_utils import as_on_gpu, compile_for_sm90, record_launches  # noqa: E402


def loops(listing):
    """(first label, instruction count, opcode counts) of each loop body in an nvdisasm listing."""
    ins, labels, out = [], {}, []
    for line in listing.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(1).strip()))  # without the predicate
    for i, text in enumerate(ins):
        m = re.search(r"BRA.*?(L_x_\d+)", text)
        if m and labels.get(m.group(1), i) < i:
            body = ins[labels[m.group(1)]:i + 1]
            out.append((m.group(1), len(body), collections.Counter(b.split()[0].split(".")[0] for b in body)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", type=json.loads, default={}, help="threshold.CONFIG overrides (JSON)")
    ap.add_argument("--sass", action="store_true", help="also count each loop's instructions")
    args = ap.parse_args()
    threshold.CONFIG.update(args.config)
    mp = pytest.MonkeyPatch()
    mp.setattr(function, "THRESHOLD_MAX_T", 1 << 62)
    launches = record_launches(mp)
    q, k, v = (torch.randn(1, 1, 130, 64, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    function.topk_attention_triton(q, k, v, 64, True).float().sum().backward()
    mp.undo()
    print(f"threshold.CONFIG = {threshold.CONFIG}")
    text = compile_for_sm90(as_on_gpu(launches), report="sass" if args.sass else True)  # one compile
    print("\n".join(ln[len("REPORT "):] for ln in text.splitlines() if ln.startswith("REPORT ")))
    if args.sass:
        for name, listing in re.findall(r"SASS-BEGIN (.*?)\n(.*?)\nSASS-END", text, re.S):
            print(f"\n{name}")
            for label, n, ops in loops(listing):
                print(f"  loop {label}: {n} instructions: " + " ".join(f"{o} {c}" for o, c in ops.most_common(12)))


if __name__ == "__main__":
    main()
