"""Encoder-decoder training and evaluation: translation (BLEU) and summarization (ROUGE).

Batch (``attnlab.tasks.translation``): ``{"src": (B, S), "src_pad_mask": (B, S) bool, "tgt_in": (B, T),
"targets": (B, T) with -100 at padding, "ids": (B,)}``.

Training loss: fairseq's ``label_smoothed_cross_entropy``: with eps = ``label_smoothing`` and V the vocabulary,
``loss = (1 - eps - eps/(V-1)) * nll + eps/(V-1) * sum_v(-log p_v)`` per scored token, summed (padding ignored);
the true-class log-likelihood ``nll_loss`` is reported beside it.

Evaluation: per split ``loss``, ``nll_loss`` (per token, nats), ``ppl`` (exp of nll_loss), ``acc``; then the
sentences are decoded with the decoding library (``attnlab.decoding``: beam search with fairseq's semantics, or
greedy), detokenized by the datamodule, and scored against the references: detokenized corpus BLEU (sacreBLEU;
``metric: bleu``) or ROUGE-1/2/L/Lsum F x 100 (rouge-score; ``metric: rouge``). Test always uses ``generation``;
validation uses ``val_generation`` (greedy by default: cheaper, and only used to pick the checkpoint), optionally on
its first ``max_batches`` batches. The hypotheses of each split are written, in sample order, to
``{run dir}/{split}.hyp.txt`` and the scores with sacreBLEU's signature to ``{split}.scores.json`` (atomically).

The datamodule provides ``special_ids`` ({"bos", "eos", "pad"}), ``decode(ids) -> str`` and
``reference(split, index) -> str``.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..decoding import beam_search, greedy
from ..io import atomic_write
from ..metrics import Ratio
from ..text_metrics import ROUGE_KEYS, CorpusBLEU, rouge_scores
from .base import BaseModule

DEFAULT_GENERATION = {"mode": "beam", "beam": 5, "lenpen": 1.0, "max_len_a": 1.2, "max_len_b": 10, "min_len": 1}
DEFAULT_VAL_GENERATION = {"mode": "greedy", "max_batches": None}


def label_smoothed_nll_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float, ignore_index: int = -100):
    """(smoothed loss sum, nll sum, number of scored tokens) over (..., V) logits; fairseq's formula, in float32."""
    lprobs = F.log_softmax(logits.float(), dim=-1)
    scored = targets != ignore_index
    t = targets.masked_fill(~scored, 0).unsqueeze(-1)
    nll = -lprobs.gather(-1, t).squeeze(-1)
    smooth = -lprobs.sum(-1)
    nll, smooth = nll.masked_fill(~scored, 0.0), smooth.masked_fill(~scored, 0.0)
    eps_i = eps / (lprobs.shape[-1] - 1)
    loss = (1.0 - eps - eps_i) * nll + eps_i * smooth
    return loss.sum(), nll.sum(), scored.sum()


class Seq2SeqModule(BaseModule):
    batch_kind = "seq2seq"

    def __init__(self, net: nn.Module, optimizer: dict, scheduler: dict | None = None,
                 scheduler_interval: str = "step", seed: int = 0, compile: bool | str = False,
                 label_smoothing: float = 0.1, metric: str = "bleu", generation: dict | None = None,
                 val_generation: dict | None = None, sacrebleu_tokenize: str = "13a"):
        if metric not in ("bleu", "rouge", "none"):
            raise ValueError(f"model.metric={metric!r}: expected bleu, rouge or none")
        self._metric_kind = metric
        self._bleu_tokenize = sacrebleu_tokenize
        super().__init__(net, optimizer, scheduler, scheduler_interval, seed, compile)
        self.generation = {**DEFAULT_GENERATION, **(generation or {})}
        self.val_generation = {**DEFAULT_VAL_GENERATION, **(val_generation or {})}
        for name, g in (("generation", self.generation), ("val_generation", self.val_generation)):
            if g["mode"] not in ("beam", "greedy", "none"):
                raise ValueError(f"model.{name}.mode={g['mode']!r}: expected beam, greedy or none")
        self._hyps: dict[str, list[tuple[int, str]]] = {"val": [], "test": []}
        self.extra_results: dict = {}  # sacreBLEU signatures and score lines, per split

    def make_metrics(self):
        m = {"loss": Ratio(), "nll_loss": Ratio(), "acc": Ratio()}
        if self._metric_kind == "bleu":
            m["bleu"] = CorpusBLEU(tokenize=self._bleu_tokenize)
        elif self._metric_kind == "rouge":
            m.update({k: Ratio() for k in ROUGE_KEYS})
        return nn.ModuleDict(m)

    def forward(self, src, src_pad_mask, tgt_in):
        # The decoder's own padding is at the end of each row: causal attention never reads it for a scored
        # position, so no target mask is passed (it would only take softmax off its fused causal path).
        return self.net(src, tgt_in, src_pad_mask, None)

    def _losses(self, batch):
        logits = self(batch["src"], batch["src_pad_mask"], batch["tgt_in"])
        loss, nll, n = label_smoothed_nll_loss(logits, batch["targets"], self.hparams.label_smoothing)
        correct = ((logits.argmax(-1) == batch["targets"]) & (batch["targets"] != -100)).sum()
        return loss, nll, n, correct

    def training_loss(self, batch):
        loss, nll, n, _ = self._losses(batch)
        self.log("train/nll_loss", nll.detach() / n.clamp_min(1))
        return loss, n

    # -- decoding ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, src: torch.Tensor, src_pad_mask: torch.Tensor, special: dict, gen: dict | None = None
                  ) -> list[torch.Tensor]:
        """Best hypothesis per sentence (token ids, eos and bos removed) under ``gen`` (default: generation)."""
        g = {**self.generation, **(gen or {})}
        memory = self.net.encode(src, src_pad_mask)
        prefix = src.new_full((src.shape[0], 1), special["bos"])
        eos, pad = special["eos"], special["pad"]
        max_len = int(g["max_len_a"] * src.shape[1] + g["max_len_b"])
        if g["mode"] == "greedy":
            max_len = min(max_len, self.net.max_len - 1)
            out = greedy(self.net, prefix, max_len, eos=eos, pad=pad, memory=memory, memory_padding_mask=src_pad_mask)
            rows = list(out)
        else:
            hyps = beam_search(self.net, prefix, eos=eos, beam_size=g["beam"], max_len_a=g["max_len_a"],
                               max_len_b=g["max_len_b"], src_len=src.shape[1], lenpen=g["lenpen"],
                               min_len=g["min_len"], pad=pad, memory=memory, memory_padding_mask=src_pad_mask)
            rows = [h[0].tokens for h in hyps]
        out = []
        for r in rows:
            r = r.tolist()
            if eos in r:
                r = r[: r.index(eos)]
            out.append(torch.tensor([t for t in r if t != pad], dtype=torch.long))
        return out

    def evaluate(self, batch, split):
        loss, nll, n, correct = self._losses(batch)
        m = self.metrics[split]
        m["loss"].update(loss, n)
        m["nll_loss"].update(nll, n)
        m["acc"].update(correct, n)
        gen = self.generation if split == "test" else {**self.generation, **self.val_generation}
        if self._metric_kind == "none" or gen["mode"] == "none":
            return
        if split == "val" and gen.get("max_batches") is not None and self._batch_idx >= gen["max_batches"]:
            return
        dm = self.trainer.datamodule
        hyp_ids = self.translate(batch["src"], batch["src_pad_mask"], dm.special_ids, gen)
        hyps = [dm.decode(h) for h in hyp_ids]
        ids = batch["ids"].tolist()
        refs = [dm.reference(split, i) for i in ids]
        self._hyps[split].extend(zip(ids, hyps))
        if self._metric_kind == "bleu":
            m["bleu"].update(hyps, refs)
        else:
            for k, scores in rouge_scores(hyps, refs).items():
                m[k].update(torch.tensor(sum(scores), dtype=torch.float64), torch.tensor(len(scores)))

    def validation_step(self, batch, batch_idx):
        self._batch_idx = batch_idx
        self.evaluate(batch, "val")

    def derived(self, values):
        return {"ppl": torch.exp(values["nll_loss"].clamp_max(80))}

    # -- outputs -------------------------------------------------------------------------------------------------
    def _write_outputs(self, split: str) -> None:
        pairs = self._hyps[split]
        self._hyps[split] = []
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered = [None] * self.trainer.world_size
            dist.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        if not pairs or self.trainer.sanity_checking:
            return
        info = {}
        if self._metric_kind == "bleu" and self.metrics[split]["bleu"].update_called:
            metric = self.metrics[split]["bleu"]
            with metric.sync_context():  # the corpus statistics of every process
                line = str(metric.score())
            info = {"bleu": line, "signature": metric.signature(), "sentences": len(pairs)}
            # the score line and signature go into the log too (results.json takes floats only)
            self.print(f"{split} BLEU: {info['bleu']} {info['signature']}")
        self.extra_results[split] = info
        if self.trainer.is_global_zero:
            out_dir = self.trainer.default_root_dir
            os.makedirs(out_dir, exist_ok=True)
            text = "".join(h + "\n" for _, h in sorted(pairs))
            atomic_write(os.path.join(out_dir, f"{split}.hyp.txt"), text)
            if info:
                atomic_write(os.path.join(out_dir, f"{split}.scores.json"), json.dumps(info, indent=1))

    def on_validation_epoch_end(self):
        self._write_outputs("val")  # before the metrics are reset (the BLEU line is read from them)
        super().on_validation_epoch_end()

    def on_test_epoch_end(self):
        self._write_outputs("test")
        super().on_test_epoch_end()
