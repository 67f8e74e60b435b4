"""Decoding library, independent of Lightning and of the attention variants.

- ``search.py``: greedy, sampling and batched beam search over any model with ``init_state / step / reorder_state``
  (and optionally ``prefill``), and ``Recompute`` (no cache: re-run the parallel form each step).
- ``graphs.py``: ``CUDAGraphs(model)``, the same model with its decode step replayed from a CUDA graph.
- ``fused.py``: ``Fused(model)``, a decoder's step as a few fused kernels per layer (the one module that knows the
  decoder's layout: pre-norm blocks of linear attention or MemSizer).
- ``ctc.py``: CTC greedy and prefix beam search over per-frame log-probabilities."""
from .ctc import beam_decode, greedy_decode, prefix_beam_search
from .fused import Fused, unfusable
from .graphs import CUDAGraphs
from .search import Hypothesis, Recompute, beam_search, filter_logits, greedy, sample, start

__all__ = ["CUDAGraphs", "Fused", "unfusable", "Hypothesis", "Recompute", "beam_search", "filter_logits", "greedy",
           "sample", "start",
           "greedy_decode", "prefix_beam_search", "beam_decode"]
