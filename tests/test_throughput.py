"""The Throughput callback: a tiny copy-task run (the config `python train.py` composes, run in-process) logs
tokens/s over its window, and the token count it used is exactly the scored tokens of the batches inside the window
(every copy sample of length L has L scored targets, so a window of W steps at batch B holds W*B*L)."""
import csv

import torch

from attnlab.callbacks import scored_tokens
from attnlab.train import run


def test_throughput_counts_the_scored_tokens_of_its_window(compose_cfg, tmp_path):
    B, L, warmup, window = 4, 5, 2, 3
    cfg = compose_cfg(["task=copy", "attention=linear", "model.net.d_model=16", "model.net.n_heads=2",
                       "model.net.d_ff=32", "model.net.n_layers=1", f"task.min_len={L}", f"task.max_len={L}",
                       f"task.batch_size={B}", "task.val_size=8", "task.test_size=8", "trainer.max_steps=6",
                       "test=false", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=csv",
                       "+callbacks.throughput._target_=attnlab.callbacks.Throughput",
                       f"+callbacks.throughput.warmup_steps={warmup}", f"+callbacks.throughput.window_steps={window}"],
                      out=tmp_path)
    run(cfg)
    with open(tmp_path / "csv/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/tokens_per_sec")]
    assert len(rows) == 1, rows  # one window, logged once
    r = rows[0]
    assert float(r["train/tokens"]) == window * B * L
    assert int(r["step"]) == warmup + window  # the window is steps warmup .. warmup+window-1
    assert float(r["train/tokens_per_sec"]) > 0
    # one process: the per-device rate is the global one
    assert float(r["train/tokens_per_sec_per_device"]) == float(r["train/tokens_per_sec"])
    assert float(r["train/tokens"]) / float(r["train/seconds"]) == float(r["train/tokens_per_sec"])


def test_scored_tokens_per_batch_kind():
    t = torch.tensor([[5, 6, -100], [-100, 7, -100]])
    assert scored_tokens({"inputs": t, "targets": t}, "lm") == 3
    assert scored_tokens({"src": t, "tgt_in": t, "targets": t}, "seq2seq") == 3
    # CTC targets are padded with real label ids: only the lengths say what is scored
    assert scored_tokens({"targets": torch.zeros(2, 9, dtype=torch.long), "target_lengths": torch.tensor([4, 2])},
                         "ctc") == 6
