"""Search over any model with an incremental form: greedy, sampling (temperature / top-k / top-p), beam search.

A *model* here is anything with

    state = model.init_state(batch_size, memory=None, memory_padding_mask=None)
    logits = model.step(tokens, state)          # tokens (B,) -> logits (B, V); the state advances IN PLACE
    state = model.reorder_state(state, index)   # a state of the rows ``index`` (N,) of the old one, in that order

and optionally ``logits = model.prefill(tokens, state, key_padding_mask=None)`` ((B, T) -> (B, T, V), the state
advanced in place as by T steps; without it the prompt is stepped through) and ``model.reserve_state(state,
length)`` (preallocate caches for the positions the search will feed). ``TransformerDecoder``,
``TransformerSeq2Seq`` (memory = ``model.encode(src, mask)``) and ``Recompute`` (no cache) are models. A step
consumes the state it is given: to branch, ``reorder_state`` (beam search does, every step). Nothing here knows
about Lightning or about attention variants.

Every search starts from a prompt ``prefix`` (B, T0 >= 1): the BOS column of a seq2seq decoder, a language-model
context, an image prefix, a forced target prefix. Prompts of different lengths are left-padded, with
``prefix_padding_mask`` (B, T0) True at the padding (which the attention states leave out; positions are still
counted from the first column, exactly as the parallel form with that mask computes them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def start(model, prefix: torch.Tensor, memory=None, memory_padding_mask=None, prefix_padding_mask=None,
          length: int | None = None):
    """init_state + the prompt -> (logits after its last position (B, V), state). ``length``: the most positions
    the search will feed, for a model with ``reserve_state(state, length)`` to preallocate its caches."""
    if prefix.dim() != 2 or prefix.shape[1] == 0:
        raise ValueError(f"decoding needs a prompt `prefix` of shape (batch, length >= 1), got {tuple(prefix.shape)}: "
                         f"the first prediction is conditioned on it. Fix: start from a BOS / separator column, "
                         f"e.g. prefix=torch.full((batch, 1), bos_id)")
    if prefix_padding_mask is not None:
        if prefix_padding_mask.shape != prefix.shape or prefix_padding_mask.dtype != torch.bool:
            raise ValueError(f"prefix_padding_mask must be bool of the prefix's shape {tuple(prefix.shape)}, got "
                             f"{prefix_padding_mask.dtype} {tuple(prefix_padding_mask.shape)}")
        if bool(prefix_padding_mask[:, -1].any()):
            raise ValueError("prompts of different lengths must be LEFT-padded (decoding continues after the last "
                             "column, which must be a real token in every row)")
    state = model.init_state(prefix.shape[0], memory, memory_padding_mask)
    if length is not None and hasattr(model, "reserve_state"):
        state = model.reserve_state(state, length)
    if hasattr(model, "prefill"):
        return model.prefill(prefix, state, prefix_padding_mask)[:, -1], state
    for t in range(prefix.shape[1]):
        logits = model.step(prefix[:, t], state) if prefix_padding_mask is None else \
            model.step(prefix[:, t], state, pad=prefix_padding_mask[:, t])
    return logits, state


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Logits (B, V) for sampling: divided by ``temperature``, only the ``top_k`` largest kept, then only the
    nucleus: the smallest set of most probable tokens whose probability reaches ``top_p`` (Holtzman et al., 2020).
    Removed tokens get -inf."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy() for argmax), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # the mass of the tokens ranked above: the first token is always kept
        remove = (before >= top_p).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


@torch.no_grad()
def _decode(model, prefix, max_new_tokens, pick, eos, pad, memory, memory_padding_mask, prefix_padding_mask):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    logits, state = start(model, prefix, memory, memory_padding_mask, prefix_padding_mask,
                          length=prefix.shape[1] + max_new_tokens - 1)  # the last token is not fed
    out, done = [], torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
    fill = pad if pad is not None else eos
    for i in range(max_new_tokens):
        if pad is not None:
            logits = logits.masked_fill(_one_hot(pad, logits), float("-inf"))
        nxt = pick(logits)
        if eos is not None:
            nxt = nxt.masked_fill(done, fill)
            done = done | (nxt == eos)
        out.append(nxt)
        if i + 1 == max_new_tokens or (eos is not None and bool(done.all())):
            break
        logits = model.step(nxt, state)
    return torch.stack(out, 1) if out else prefix.new_zeros(prefix.shape[0], 0)


def _one_hot(token: int, logits: torch.Tensor) -> torch.Tensor:
    return torch.arange(logits.shape[-1], device=logits.device) == token


def greedy(model, prefix: torch.Tensor, max_new_tokens: int, *, eos: int | None = None, pad: int | None = None,
           memory=None, memory_padding_mask=None, prefix_padding_mask=None) -> torch.Tensor:
    """The argmax token at each step. Returns the new tokens (B, n <= max_new_tokens): with ``eos``, a row ends
    at its EOS (included) and is filled with ``pad`` (else ``eos``) after it; decoding stops once every row has
    ended. ``pad`` is never generated."""
    return _decode(model, prefix, max_new_tokens, lambda lg: lg.argmax(-1), eos, pad, memory, memory_padding_mask,
                   prefix_padding_mask)


def sample(model, prefix: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None, eos: int | None = None,
           pad: int | None = None, memory=None, memory_padding_mask=None, prefix_padding_mask=None) -> torch.Tensor:
    """Ancestral sampling from ``filter_logits(logits, temperature, top_k, top_p)``; ``generator`` (on the
    logits' device) makes it reproducible. Output as ``greedy``."""
    filter_logits(prefix.new_zeros(1, 2).float(), temperature, top_k, top_p)  # argument errors before any work

    def pick(logits):
        probs = filter_logits(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                              temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return _decode(model, prefix, max_new_tokens, pick, eos, pad, memory, memory_padding_mask, prefix_padding_mask)


@dataclass
class Hypothesis:
    tokens: torch.Tensor             # (L,) the generated tokens, the final EOS included (the prompt is not)
    score: float                     # sum(positional_scores) / L ** lenpen
    positional_scores: torch.Tensor  # (L,) the log-probability of each token


@torch.no_grad()
def beam_search(model, prefix: torch.Tensor, *, eos: int, beam_size: int = 5, max_len_a: float = 0.0,
                max_len_b: int = 200, src_len: int = 0, lenpen: float = 1.0, min_len: int = 1, nbest: int = 1,
                pad: int | None = None, memory=None, memory_padding_mask=None,
                prefix_padding_mask=None) -> list[list[Hypothesis]]:
    """Batched beam search with fairseq's semantics (``SequenceGenerator``). Returns, per sentence, its ``nbest``
    best finished hypotheses, best first.

    - A hypothesis' score is the sum of its tokens' log-probabilities; finished ones are ranked by
      score / length ** lenpen (length counts the generated tokens, EOS included).
    - At most ``max_len = int(max_len_a * src_len + max_len_b)`` tokens before EOS (fewer if the model's
      positions run out: ``model.max_len`` - prompt length); EOS is forced at step max_len and banned before step
      ``min_len``; ``pad`` is never generated.
    - Each step takes the 2 * beam_size best continuations of all live hypotheses; those ending in EOS among the
      first beam_size are finished, the first beam_size others live on (the state follows by ``reorder_state``).
      A sentence is done when it has beam_size finished hypotheses or at max_len; done sentences leave the batch.
    - At the first step only one copy of the (identical) beams is expanded.
    """
    B, T0 = prefix.shape
    K = beam_size
    if K < 1 or not 1 <= nbest <= K:
        raise ValueError(f"need beam_size >= 1 and 1 <= nbest <= beam_size; got beam_size={K}, nbest={nbest}")
    max_len = int(max_len_a * src_len + max_len_b)
    if getattr(model, "max_len", None) is not None:
        max_len = min(max_len, model.max_len - T0)
    if max_len < 0 or min_len > max_len:
        raise ValueError(f"no room to decode: max_len={max_len} (max_len_a * src_len + max_len_b, capped by the "
                         f"model's positions minus the prompt), min_len={min_len}. Fix: raise max_len_b, lower "
                         f"min_len or shorten the prompt")
    logits, state = start(model, prefix, memory, memory_padding_mask, prefix_padding_mask, length=T0 + max_len)
    expand = torch.arange(B, device=prefix.device).repeat_interleave(K)
    state, logits = model.reorder_state(state, expand), logits[expand]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    scores = torch.zeros(B, K, dtype=dtype, device=logits.device)
    tokens = prefix.new_zeros(B * K, 0)
    pos_scores = scores.new_zeros(B * K, 0)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    alive = list(range(B))  # the sentences still searched, in the order of the state's rows
    neg_inf = float("-inf")
    for step in range(max_len + 1):
        N = len(alive)
        lp = F.log_softmax(logits.to(dtype), -1)  # (N * K, V)
        V = lp.shape[-1]
        if pad is not None:
            lp[:, pad] = neg_inf
        if step >= max_len:  # force EOS: every other token is banned, EOS keeps its log-probability
            lp = lp.masked_fill(~_one_hot(eos, lp), neg_inf)
        elif step < min_len:
            lp[:, eos] = neg_inf
        cand = scores.view(N, K, 1) + lp.view(N, K, V)
        if step == 0:
            cand[:, 1:] = neg_inf
        cscores, cidx = cand.view(N, K * V).topk(min(2 * K, K * V), dim=1)
        cbeam, ctok = cidx // V, cidx % V
        is_eos = ctok == eos
        # EOS among the first K candidates finishes a hypothesis (fairseq); a -inf one is not a hypothesis
        for n, j in (is_eos[:, :K] & cscores[:, :K].isfinite()).nonzero().tolist():
            sent = alive[n]
            if len(finished[sent]) < K:
                row = n * K + int(cbeam[n, j])
                finished[sent].append(Hypothesis(
                    tokens=torch.cat([tokens[row], ctok.new_full((1,), eos)]),
                    score=float(cscores[n, j]) / (step + 1) ** lenpen,
                    positional_scores=torch.cat([pos_scores[row], lp[row, eos].view(1)])))
        if step == max_len:
            break
        keep = [n for n in range(N) if len(finished[alive[n]]) < K]
        if not keep:
            break
        # the first K candidates that are not EOS live on (there are >= K: at most one EOS per beam)
        sel = torch.sort(is_eos.to(torch.int8), dim=1, stable=True).indices[:, :K]
        keep_t = torch.tensor(keep, device=cidx.device)
        nbeam, ntok = cbeam.gather(1, sel)[keep_t], ctok.gather(1, sel)[keep_t]
        rows = (keep_t[:, None] * K + nbeam).view(-1)  # rows of the old state
        ntok = ntok.reshape(-1)
        scores = cscores.gather(1, sel)[keep_t]
        tokens = torch.cat([tokens[rows], ntok[:, None]], 1)
        pos_scores = torch.cat([pos_scores[rows], lp[rows, ntok][:, None]], 1)
        alive = [alive[n] for n in keep]
        state = model.reorder_state(state, rows)
        logits = model.step(ntok, state)
    return [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in finished]


class Recompute:
    """A model without a cache: every step re-runs the parallel form over the whole prefix (O(t^2) work per
    sequence for softmax). The "no cache" decoding mode, and the reference that cached decoding is tested against.

    ``net(tokens, key_padding_mask, memory, memory_padding_mask) -> logits (B, T, V)``, e.g. a
    ``TransformerDecoder`` (a seq2seq model's ``.decoder``, with memory = ``model.encode(src, mask)``)."""

    def __init__(self, net):
        self.net = net
        self.max_len = getattr(net, "max_len", None)

    def init_state(self, batch_size, memory=None, memory_padding_mask=None) -> dict:
        device = memory.device if memory is not None else next(self.net.parameters()).device
        return {"tokens": torch.zeros(batch_size, 0, dtype=torch.long, device=device),
                "pad": torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
                "memory": memory, "memory_padding_mask": memory_padding_mask}

    def prefill(self, tokens, state, key_padding_mask=None):
        T = tokens.shape[1]
        state["tokens"] = torch.cat([state["tokens"], tokens], 1)
        new_pad = key_padding_mask if key_padding_mask is not None else torch.zeros_like(tokens, dtype=torch.bool)
        state["pad"] = torch.cat([state["pad"], new_pad], 1)
        pad = state["pad"] if bool(state["pad"].any()) else None
        return self.net(state["tokens"], pad, state["memory"], state["memory_padding_mask"])[:, -T:]

    def step(self, tokens, state, pad=None):
        return self.prefill(tokens.view(-1, 1), state, None if pad is None else pad.view(-1, 1))[:, 0]

    @staticmethod
    def reorder_state(state, index) -> dict:
        return {k: v.index_select(0, index) if torch.is_tensor(v) else v for k, v in state.items()}
