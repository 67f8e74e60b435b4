"""GPU sweep of the config grid of issue #11: every op, forward and backward, at every width / slot count / head
count / dtype a config can ask for, with the block sizes kernels/fit.py picks for this device.

    python3 bench/check_fit_gpu.py [--out DIR] [--workers 12]

Grid: model width d in 64..1024, MemSizer slots k in 4..64, heads 1..16, float32 and bf16. Ops: linear attention
causal and bidirectional (head width d/heads; widths over 256 take the PyTorch path by design and are listed as
such), MemSizer causal and bidirectional (k x d: heads do not change the op, one memory is shared by the heads),
top-k (head width d/heads, k = the slot values as top-k), and both decode steps. Each case: NaN-poisoned buffers,
forward + backward against float64 (relative L2 error), and for every kernel the compiler built for it, the
shared memory and registers it really uses against fit.py's estimate. Cases run in worker processes (compilation
dominates). Writes fit_sweep.json; prints a summary table last."""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import time
import traceback

WIDTHS, SLOTS, HEADS = (64, 128, 256, 512, 1024), (4, 8, 16, 32, 64), (1, 2, 4, 8, 16)
DTYPES = ("float32", "bfloat16")
TOL = {"float32": 2e-4, "bfloat16": 3e-2}


def cases():
    out = []
    head_dims = sorted({d // h for d in WIDTHS for h in HEADS})
    for dt in DTYPES:
        for dh in head_dims:
            for causal in (True, False):
                out.append(("linear", dict(dh=dh, causal=causal, dt=dt)))
            out.append(("linear_step", dict(dh=dh, dt=dt)))
            if dh <= 256:
                for k in SLOTS:
                    out.append(("topk", dict(dh=dh, k=k, dt=dt)))
        for d, k in itertools.product(WIDTHS, SLOTS):
            for causal in (True, False):
                out.append(("memsizer", dict(d=d, k=k, causal=causal, dt=dt)))
            out.append(("memsizer_step", dict(d=d, k=k, dt=dt)))
    return out


def _compiled(fns):
    """{(kernel name, cache key): (shared bytes, registers, spills)} of everything compiled so far."""
    seen = {}
    for fn in fns:
        for dev_cache in getattr(fn, "device_caches", {}).values():
            for key, k in dev_cache[0].items():
                seen[(fn.__name__, str(key))] = (k.metadata.shared, getattr(k, "n_regs", -1), getattr(k, "n_spills", -1))
    return seen


def chunk_estimates(est, B, H, DK, DV, T, in_bytes, smem):
    """fit.py's shared-memory estimates of the chunk kernels at these shapes, into est (by kernel name)."""
    import attnlab.kernels.linear_attn.chunk as chunk
    from attnlab.kernels import fit
    for kerns in chunk.GROUPS.values():
        cfg = fit.fit_chunk(kerns, DK, DV, in_bytes, smem, BT=(64, 32))
        est.update({k: fit.chunk_smem(k, cfg["BT"], cfg["BK"], cfg["BV"], in_bytes, cfg["stages"]) for k in kerns})
    tiles = chunk._serial_tiles(B, H, DK, DV, T, cfg["BT"], in_bytes, smem)
    if tiles:
        est["prefix"] = fit.chunk_smem("prefix", cfg["BT"], *tiles, in_bytes, chunk.CONFIG["serial_stages"])


def run_case(op, p):
    import torch

    import attnlab.kernels.linear_attn.chunk as chunk
    import attnlab.kernels.topk_attn.chunk as tchunk
    import attnlab.kernels.topk_attn.threshold as thr
    from attnlab.kernels import fit
    from attnlab.kernels.linear_attn import linear_attention, linear_attention_step
    from attnlab.kernels.linear_attn.reference import linear_attention_ref, linear_attention_step_ref
    from attnlab.kernels.linear_attn.recurrent import _step_kernel
    from attnlab.kernels.memsizer import memsizer, memsizer_step
    from attnlab.kernels.memsizer.reference import memsizer_ref, memsizer_step_ref
    from attnlab.kernels.topk_attn import topk_attention
    from attnlab.kernels.topk_attn.function import takes_threshold
    from attnlab.kernels.topk_attn.reference import topk_attention_dense

    chunk.CONFIG.update(json.loads(os.environ.get("FIT_CONFIG", "{}")))  # --config
    fns = [chunk._state_kernel, chunk._prefix_kernel, chunk._fwd_kernel, chunk._bwd_q_kernel, chunk._bwd_kv_kernel,
           chunk._bwd_chunk_kernel, chunk._dden_kernel, tchunk._fwd_kernel,
           tchunk._out_kernel, tchunk._bwd_kernel, thr._select_kernel, thr._fwd_kernel, thr._bwd_dq_kernel,
           thr._bwd_dkdv_kernel, _step_kernel]
    before = _compiled(fns)
    dev, dt = os.environ.get("FIT_DEVICE", "cuda"), getattr(torch, p["dt"])  # cpu + TRITON_INTERPRET=1: a smoke run
    g = torch.Generator(device=dev).manual_seed(hash((op, tuple(sorted(p.items())))) % 2 ** 31)
    smem = fit.smem_limit(torch.device(dev))

    def rnd(*shape):
        return torch.randn(*shape, device=dev, generator=g)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    def fb(fn, xs, dy):
        xs = [x.detach().to(dt).requires_grad_() for x in xs]
        y = fn(*xs)
        return [y, *torch.autograd.grad(y, xs, dy.to(dt))]

    def ref(fn, xs, dy):
        xs = [x.detach().to(dt).double().requires_grad_() for x in xs]
        y = fn(*xs)
        return [y, *torch.autograd.grad(y, xs, dy.to(dt).double())]

    B, T = 2, 200  # 4 chunks of 64, a ragged last one
    est = {}
    if op == "linear":
        H, dh = max(1, 256 // max(p["dh"], 16)), p["dh"]
        xs, dy = [rnd(B, H, T, dh) for _ in range(3)], rnd(B, H, T, dh)
        got = fb(lambda q, k, v: linear_attention(q, k, v, causal=p["causal"]), xs, dy)
        exp = ref(lambda q, k, v: linear_attention_ref(q, k, v, causal=p["causal"]), xs, dy)
        path = "torch (d > 256)" if dh > 256 else "triton"
        if dh <= 256:
            chunk_estimates(est, B, H, dh, dh, T, dt.itemsize, smem)
    elif op == "memsizer":
        d, k = p["d"], p["k"]
        xs = [rnd(B, T, k).softmax(-1), rnd(B, T, k), rnd(B, T, d)]
        dy = rnd(B, T, d)
        got = fb(lambda a, b, c: memsizer(a, b, c, p["causal"]), xs, dy)
        exp = ref(lambda a, b, c: memsizer_ref(a, b, c, p["causal"]), xs, dy)
        path = "triton"
        chunk_estimates(est, B, 1, k, d, T, dt.itemsize, smem)
    elif op == "topk":
        H, dh, kk = 2, p["dh"], p["k"]
        xs, dy = [rnd(B, H, T, dh) for _ in range(3)], rnd(B, H, T, dh)
        got = fb(lambda q, k, v: topk_attention(q, k, v, kk, True, backend="triton" if dh <= 256 else "auto"), xs, dy)
        # float64 dense top-k on the same (rounded) inputs; bf16 may pick a few other keys where scores tie
        exp = ref(lambda q, k, v: topk_attention_dense(q, k, v, kk, True), xs, dy)
        path = "triton"
        if not takes_threshold(T, dh, dh):  # the sparse kernels (fitted); the threshold kernels have no estimate
            c = fit.fit_topk(dh, 1 << (kk - 1).bit_length(), dt.itemsize, smem)
            est["_fwd_kernel"] = fit.topk_smem(c["BM"], c["BN"], max(16, 1 << (dh - 1).bit_length()), dt.itemsize,
                                               c["stages"])
    elif op == "linear_step":
        H, dh = 8, p["dh"]
        q, k, v = (rnd(64, H, dh).to(dt) for _ in range(3))
        S, z = rnd(64, H, dh, dh).abs(), rnd(64, H, dh).abs() + 1
        with torch.no_grad():  # the model's decode state is float32, its inputs in the model's dtype
            got = list(linear_attention_step(q, k, v, S, z, backend="triton") if dh <= 256 else
                       linear_attention_step(q.float(), k.float(), v.float(), S, z, backend="torch"))
        exp = list(linear_attention_step_ref(q.double(), k.double(), v.double(), S.double(), z.double()))
        path = "triton" if dh <= 256 else "torch (d > 256)"
    else:  # memsizer_step
        d, k = p["d"], p["k"]
        pp, a, v = rnd(64, k).softmax(-1).to(dt), rnd(64, k).to(dt), rnd(64, d).to(dt)
        S, c = rnd(64, k, d), torch.full((64,), 10.0, device=dev)
        with torch.no_grad():
            got = list(memsizer_step(pp, a, v, S, c, backend="triton"))
        exp = list(memsizer_step_ref(pp.double(), a.double(), v.double(), S.double(), c.double()))
        path = "triton"
    if dev == "cuda":
        torch.cuda.synchronize()
    errs = [rel(a, b) for a, b in zip(got, exp)]
    tol = TOL[p["dt"]] * (3 if op == "topk" else 1)
    new = {k: v for k, v in _compiled(fns).items() if k not in before}
    kern = [{"kernel": name, "shared": sh, "regs": r, "spills": s, "estimate": est.get(name.lstrip("_")
                                                                                          .replace("_kernel", ""),
                                                                                          est.get(name))}
            for (name, _), (sh, r, s) in new.items()]
    return dict(op=op, **p, path=path, errs=errs, ok=all(e == e and e < tol for e in errs), kernels=kern)


def worker(items, q):
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    for op, p in items:
        t = time.time()
        try:
            r = run_case(op, p)
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            r = dict(op=op, **p, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}",
                     tb=traceback.format_exc()[-1500:])
        r["s"] = round(time.time() - t, 2)
        q.put(r)
    q.put(None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--budget-s", type=float, default=330)
    ap.add_argument("--ops", nargs="+", help="only these ops (linear, memsizer, topk, linear_step, memsizer_step)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    ap.add_argument("--config", default="{}", help="JSON overrides of the chunk kernels' CONFIG, e.g. "
                    '\'{"serial_programs": 1}\' to send every causal case through the serial state pass')
    args = ap.parse_args()
    os.environ["FIT_CONFIG"] = args.config  # the spawned workers apply it
    os.makedirs(args.out, exist_ok=True)
    todo = [c for c in cases() if (not args.ops or c[0] in args.ops) and c[1]["dt"] in args.dtypes]
    # slow compiles (top-k, float32) spread over the workers
    todo.sort(key=lambda c: (c[0] != "topk", c[1]["dt"] != "float32"))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(todo[i::args.workers], q), daemon=True) for i in range(args.workers)]
    for pr in procs:
        pr.start()
    results, done, t0 = [], 0, time.time()
    while done < len(procs) and time.time() - t0 < args.budget_s:
        try:
            r = q.get(timeout=5)
        except Exception:  # noqa: BLE001 - queue.Empty: check the budget
            continue
        if r is None:
            done += 1
            continue
        results.append(r)
        if not r["ok"]:
            print("FAIL", {k: v for k, v in r.items() if k != "tb"}, flush=True)
    for pr in procs:
        pr.terminate()
    with open(os.path.join(args.out, "fit_sweep.json"), "w") as f:
        json.dump(dict(total=len(todo), results=results), f, indent=1)
    # summary
    over = [(r["op"], k) for r in results for k in r.get("kernels", []) if k["estimate"] and k["shared"] > k["estimate"]]
    ratio = [k["shared"] / k["estimate"] for r in results for k in r.get("kernels", []) if k["estimate"]]
    print(f"\nfit sweep: {len(results)}/{len(todo)} cases run in {time.time() - t0:.0f} s, "
          f"{sum(r['ok'] for r in results)} ok, {sum(not r['ok'] for r in results)} failed")
    for op in ("linear", "memsizer", "topk", "linear_step", "memsizer_step"):
        rs = [r for r in results if r["op"] == op]
        if rs:
            worst = max((max(r["errs"]) for r in rs if "errs" in r), default=float("nan"))
            print(f"  {op:14s} {sum(r['ok'] for r in rs)}/{len(rs)} ok, worst rel err {worst:.2e}, "
                  f"paths {sorted({r.get('path', 'error') for r in rs})}")
    smem = max((k["shared"] for r in results for k in r.get("kernels", [])), default=0)
    print(f"  kernels compiled: {len(ratio)} with an estimate; actual/estimate shared memory max "
          f"{max(ratio, default=float('nan')):.2f}, median {sorted(ratio)[len(ratio) // 2] if ratio else float('nan'):.2f};"
          f" over the estimate: {len(over)} {over[:5]}; largest shared {smem} B; spills "
          f"{sum(1 for r in results for k in r.get('kernels', []) if k['spills'] and k['spills'] > 0)} kernels")


if __name__ == "__main__":
    main()
