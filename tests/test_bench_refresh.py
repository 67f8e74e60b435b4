"""bench/refresh.py: the generated block of bench/RESULTS.md, from benchmark JSON written here (no GPU needed)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import refresh  # noqa: E402


def model_run(date, points, gen=()):
    return {"label": "x", "device": "GPU", "torch": "t", "triton": "tr", "date": date,
            "train": [{"variant": v, "T": T, "tok_s": k * 1e3, "peak_mib": 100.0} for v, T, k in points],
            "generate": [{"variant": v, "B": B, "img_s": i, "ms_per_token": 1.0} for v, B, i in gen]}


def op_run(times, timing=None, date="2026-01-01"):
    config = {"variants": sorted({v for v, _ in times}, key=lambda v: v != "sdpa"), "B": 8, "H": 16, "D": 64,
              "dtype": "bfloat16", **({"timing": timing} if timing else {})}  # results before session 5: no timing
    return {"device": "GPU", "torch": "t", "triton": "tr", "fla": "f", "date": date, "commit": "c",
            "baseline": "sdpa", "config": config,
            "rows": [{"variant": v, "T": T, "B": 8, "H": 16, "fwdbwd_ms": ms,
                      "fwdbwd_x_sdpa": ms / times[("sdpa", T)] if ("sdpa", T) in times else None}
                     for (v, T), ms in times.items()]
            + [{"variant": "linear_triton", "T": 4096, "B": 1, "H": 12, "fwdbwd_ms": 99.0}]}  # fallback: ignored


def write_runs(tmp_path, op, runs, folder="op"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "results.json").write_text(json.dumps(op))
    for i, r in enumerate(runs):
        (tmp_path / f"model_{i}.json").write_text(json.dumps(r))


def test_targets_use_cuda_graph_runs_and_later_runs_win(tmp_path):
    """Targets read the CUDA-graph runs; each ratio pairs two points of one run, the latest run that has both."""
    eager = [("softmax", T, 500) for T in (1024, 8192, 16384)] + [("linear", T, 400) for T in (1024, 8192, 16384)]
    graphs = [("softmax+reduce-overhead", 1024, 1000), ("linear+reduce-overhead", 1024, 1100),
              ("softmax+reduce-overhead", 8192, 500), ("linear+reduce-overhead", 8192, 900),
              ("memsizer+reduce-overhead", 1024, 1200), ("memsizer+reduce-overhead", 8192, 800)]
    old = model_run("2026-01-01", eager + graphs, gen=[("linear+graph", 16, 5.0), ("linear+graph", 4096, 300.0)])
    # the later run has both points at 8192 (its ratio counts) but only linear at 1024 (the old run's pair counts)
    new = model_run("2026-01-02", [("linear+reduce-overhead", 8192, 1100), ("softmax+reduce-overhead", 8192, 500),
                                   ("linear+reduce-overhead", 1024, 3000)], gen=[("linear+graph", 16, 25.0)])
    op = op_run({("sdpa", 2048): 1.0, ("linear_triton", 2048): 0.5, ("sdpa", 4096): 4.0,
                 ("linear_triton", 4096): 1.0, ("fla_chunk_raw", 4096): 0.8, ("topk_triton", 4096): 9.0})
    write_runs(tmp_path, op, [new, old])  # file order does not matter: the dates do
    ops, runs = refresh.load([str(tmp_path)])
    assert [r["date"] for r in runs] == ["2026-01-01", "2026-01-02"] and list(ops) == ["eager"]
    rows = {t: (n, v) for t, n, v in refresh.train_targets(refresh.merged(runs, "train", "T"), runs)}
    assert rows["linear >= softmax tokens/s at T=1024 (CUDA graphs)"] == ("1.10x", "**met**")  # not 3000 / 1000
    assert rows["linear >= 2x softmax tokens/s at T=8192 (CUDA graphs)"] == ("2.20x", "**met**")  # the later run
    assert rows["linear >= 4x softmax tokens/s at T=16384 (CUDA graphs)"] == ("-", "not measured")
    assert rows["MemSizer >= linear at every T (CUDA graphs)"] == ("1.09x (1024), 0.89x (8192)", "**missed**")
    gen = {t: (n, v) for t, n, v in refresh.generate_targets(refresh.merged(runs, "generate", "B"))}
    assert gen["linear+graph: >= 20 images/s at batch 16"] == ("25.00", "**met**")
    assert gen["linear+graph: >= 200 images/s at the best batch"] == ("300.0 (batch 4096)", "**met**")
    fused = model_run("2026-01-03", [], gen=[("memsizer+graph", 16, 30.0), ("memsizer+fused", 16, 19.0)])
    gen = {t: (n, v) for t, n, v in refresh.generate_targets(refresh.merged(runs + [fused], "generate", "B"))}
    assert gen["memsizer+fused: >= 20 images/s at batch 16"] == ("19.00", "**missed**")  # the fused step, if run
    ops = {t: (n, v) for t, n, v in refresh.op_targets(ops["eager"])}
    assert ops["linear fwd+bwd <= default-backend SDPA at T >= 2048 (eager)"] == ("0.50x (2048), 0.25x (4096)",
                                                                                   "**met**")
    assert ops["linear fwd+bwd <= fla normalize=False at T >= 4096 (eager)"] == ("1.25x (4096)", "**missed**")
    assert ops["top-k (k=64) fwd+bwd <= 2x default-backend SDPA at T >= 4096 (eager)"] == ("2.25x (4096)",
                                                                                          "**missed**")


def test_graph_timed_op_results_are_judged_beside_eager_ones(tmp_path):
    """op_graph/ (bench_attention --timing graph) is read as its own table and its own target rows; of two runs
    timed the same way the newer one counts."""
    write_runs(tmp_path, op_run({("sdpa", 4096): 4.0, ("linear_triton", 4096): 6.0}), [])
    write_runs(tmp_path, op_run({("sdpa", 4096): 2.0, ("linear_triton", 4096): 1.0}, "graph", "2026-01-03"), [],
               folder="op_graph")
    (tmp_path / "old").mkdir()
    write_runs(tmp_path / "old", op_run({("sdpa", 4096): 2.0, ("linear_triton", 4096): 9.0}, "graph"), [],
               folder="op_graph")
    ops, _ = refresh.load([str(tmp_path / "old"), str(tmp_path)])
    assert sorted(ops) == ["eager", "graph"] and ops["graph"]["date"] == "2026-01-03"
    text = refresh.section(ops, [])
    assert "Op level, eager:" in text and "Op level, CUDA graphs:" in text
    assert "| linear fwd+bwd <= default-backend SDPA at T >= 2048 (eager) | 1.50x (4096) | **missed** |" in text
    assert "| linear fwd+bwd <= default-backend SDPA at T >= 2048 (CUDA graphs) | 0.50x (4096) | **met** |" in text


def test_eager_targets_when_no_compiled_run():
    runs = [model_run("d", [("softmax", 1024, 500), ("linear", 1024, 250)])]
    train = refresh.merged(runs, "train", "T")
    assert refresh.train_targets(train, runs)[0] == ("linear >= softmax tokens/s at T=1024 (eager)", "0.50x",
                                                      "**missed**")


def test_write_replaces_only_the_marked_block(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nbefore\n\n<!-- refresh:begin -->\nold\n<!-- refresh:end -->\n\nafter\n")
    refresh.write(str(md), "<!-- refresh:begin -->\nnew\n<!-- refresh:end -->")
    assert md.read_text() == "# Results\n\nbefore\n\n<!-- refresh:begin -->\nnew\n<!-- refresh:end -->\n\nafter\n"
    fresh = tmp_path / "NEW.md"
    fresh.write_text("# Title\nbody\n")
    refresh.write(str(fresh), "<!-- refresh:begin -->\nx\n<!-- refresh:end -->")
    assert fresh.read_text() == "# Title\n\n<!-- refresh:begin -->\nx\n<!-- refresh:end -->\nbody\n"
    md.write_text("# R\n<!-- refresh:begin -->\n")
    with pytest.raises(ValueError, match="only one of the markers"):
        refresh.write(str(md), "x")


def test_the_section_renders_the_tables(tmp_path):
    write_runs(tmp_path, op_run({("sdpa", 4096): 4.0, ("linear_triton", 4096): 1.0}),
               [model_run("d", [("softmax", 1024, 500), ("linear", 1024, 400)], gen=[("softmax", 1, 0.5)])])
    text = refresh.section(*refresh.load([str(tmp_path)]))
    assert text.startswith(refresh.BEGIN) and text.endswith(refresh.END)
    assert "| softmax | 500k, 100 |" in text and "| linear | 400k, 100 |" in text
    assert "| 4096 | 8,16 | 4 | 1 (0.25x) |" in text and "| softmax | 0.50 (1.00 ms) |" in text


def test_topk_op_target_reads_the_newest_check_run(tmp_path):
    """The top-k op target has a row from bench/check_topk_gpu.py's timing (the last folder holding a
    topk_threshold_final.json) beside the op table's row (bench_attention.py's top-k rows)."""
    write_runs(tmp_path, op_run({("sdpa", 4096): 4.0, ("topk_triton", 4096): 30.0}), [])
    for name, ms in (("a", 12.0), ("b", 7.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "topk_threshold_final.json").write_text(json.dumps({"results": {"timing": [
            {"T": 2048, "sdpa": {"fwdbwd_ms": 1.0}, "topk_triton": {"fwdbwd_ms": 3.0}},
            {"T": 4096, "sdpa": {"fwdbwd_ms": 3.5, "fwdbwd_synced_ms": 3.6},
             "topk_triton": {"fwdbwd_ms": ms, "fwdbwd_synced_ms": ms + 0.3}}]}}))
    dirs = [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "b")]
    ops, runs = refresh.load(dirs)
    text = refresh.section(ops, runs, refresh.topk_check(dirs))
    rows = [ln for ln in text.splitlines() if ln.startswith("| top-k (k=64) fwd+bwd")]
    assert len(rows) == 3 and all("b/topk_threshold_final.json" in r for r in rows[1:]), rows
    assert rows[0].endswith("(eager) | 7.50x (4096) | **missed** |"), rows
    assert "back to back" in rows[1] and rows[1].endswith("| 2.00x (4096) | **met** |"), rows
    assert "each call alone" in rows[2] and rows[2].endswith("| 2.03x (4096) | **missed** |"), rows


def test_fla_op_target_reads_the_newest_kernel_times_run(tmp_path):
    """The fla op target comes from bench/kernel_times.py (the last folder holding kernel_times/kernel_times.json,
    its default-CONFIG rows at B=8, H=16), for the linear op, on features mapped outside (linear_mapped) and for its
    kernels on fla's math (linear_raw)."""
    write_runs(tmp_path, op_run({("sdpa", 4096): 4.0, ("linear_triton", 4096): 1.0, ("fla_chunk_raw", 4096): 0.1}), [])
    for name, lin in (("a", 9.0), ("b", 0.8)):
        (tmp_path / name / "kernel_times").mkdir(parents=True)
        (tmp_path / name / "kernel_times" / "kernel_times.json").write_text(json.dumps([
            {"op": op, "B": 8, "H": 16, "T": T, "config": {}, "ms": ms}
            for T in (2048, 4096) for op, ms in (("linear", lin), ("linear_mapped", 0.45), ("linear_raw", 0.3),
                                                 ("fla", 0.5))]
            + [{"op": "linear", "B": 8, "H": 16, "T": 4096, "config": {"BT": 32}, "ms": 0.1},
               {"op": "linear", "B": 4, "H": 8, "T": 4096, "config": {}, "ms": 0.1}]))  # not the default: ignored
    dirs = [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "b")]
    ops, runs = refresh.load(dirs)
    text = refresh.section(ops, runs, fla=refresh.fla_check(dirs))
    rows = [ln for ln in text.splitlines() if "<= fla normalize=False" in ln]
    assert len(rows) == 3 and all("b/kernel_times/kernel_times.json" in r for r in rows), rows
    assert rows[0].startswith("| linear fwd+bwd") and rows[0].endswith("| 1.60x (4096) | **missed** |"), rows
    assert "linear_mapped" in rows[1] and rows[1].endswith("| 0.90x (4096) | **met** |"), rows
    assert "linear_raw" in rows[2] and rows[2].endswith("| 0.60x (4096) | **met** |"), rows
