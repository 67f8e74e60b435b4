"""Decode steps replayed from a CUDA graph: one launch per token instead of hundreds.

``CUDAGraphs(model)`` first lowers the step to fused kernels where ``fused.Fused`` applies (pre-norm linear-attention
and MemSizer decoders; ``fuse=False`` keeps the model's own step), then captures whichever step it runs.

A decode step of a small model is host-bound: a 16-layer model issues a few hundred kernels per token, each costing
more CPU time to launch than GPU time to run (bench/RESULTS.md: 9.3 ms per token eager, 1.1 ms replayed).
``CUDAGraphs(model)`` is a model for the search functions (``greedy(CUDAGraphs(net), prefix, n)``): ``init_state``,
``prefill`` and ``reorder_state`` are the model's own;
``step`` captures the model's step once into a CUDA graph over static buffers (the token, the position, every state
tensor) and replays it afterwards. The graph computes exactly what the eager step computes, on the same kernels.

Under autocast, the weights that the step only ever hands to ``F.linear`` are cast to the autocast dtype once, outside
the graph, and the graph reads those copies: autocast would otherwise launch one cast kernel per weight and bias per
token (274 of the 512 kernels of a 16-layer step; NOTES.md). The copies are refreshed whenever a weight changes
(its version counter moves, e.g. an optimizer step between two searches). Linear's own cast gives the same bits.

It applies when the state keeps its shapes from step to step: the recurrent states of linear attention, MemSizer and
Performer, cross-attention over a fixed memory, and softmax's preallocated KV cache while it has room (its step reads
the whole buffer under a mask; the graph takes the write slot, ``length``, from a device tensor filled before each
replay; when the cache is full, one eager step doubles it and the next step captures again; the searches reserve the
whole length up front, so they capture once). Top-k's step reads only the written slots and Reformer's cache grows by
concatenation, so those steps run eagerly; so does every step on the CPU, and a step with a padding mask. A state
handed in that is not the one the graph owns (a new search, or ``reorder_state`` in beam search) is copied into the
graph's buffers first, and after the step it holds those buffers: one live state per wrapper (two searches interleaved
need two wrappers).
"""
from __future__ import annotations

import contextlib
import operator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

_TENSOR = object()  # marks where a state holds a tensor, in the structure a graph is captured for
_LENGTH = object()  # marks a KV cache's ``length``: an int outside the graph, a device tensor inside


def _leaves(state: dict) -> list:
    """The state's tensors in a fixed order (layers, then each attention state's entries), lengths left out."""
    return [v for states in state["layers"] for s in states for k, v in s.items()
            if torch.is_tensor(v) and k != "length"]


def _caches(state: dict) -> list:
    """The attention states that are KV caches (they count their written slots in ``length``)."""
    return [s for states in state["layers"] for s in states if "length" in s]


def _signature(state: dict, tokens: torch.Tensor) -> tuple:
    """What a captured graph is valid for: every leaf's shape and dtype, the non-tensor entries but the caches'
    lengths (the graph reads them from a device tensor), autocast."""
    dev = tokens.device.type
    return (tuple(tokens.shape), torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev),
            tuple((tuple(v.shape), v.dtype) if torch.is_tensor(v) else (k,) if k == "length" else (k, v)
                  for states in state["layers"] for s in states for k, v in s.items()))


def _copy_into(dst: list, src: list) -> None:
    """Copy each tensor of ``src`` into its counterpart in ``dst`` (skipping those that already are it)."""
    for d, s in zip(dst, src):
        if d is not s:
            d.copy_(s)


class _LinearOnly(TorchFunctionMode):
    """Records, over the calls it sees, which of ``params`` are only ever the weight or bias of ``F.linear``: any
    other use (another op, reading ``.dtype`` for an allocation, a custom Function) excludes a parameter."""

    def __init__(self, params):
        super().__init__()
        self.params = {id(p): p for p in params}
        self.linear, self.other = set(), set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, a in enumerate([*args, *kwargs.values()]):
            if isinstance(a, torch.Tensor) and id(a) in self.params:
                (self.linear if func is F.linear and i in (1, 2) else self.other).add(id(a))
        return func(*args, **kwargs)

    def result(self) -> list:
        return [self.params[i] for i in self.linear - self.other]


class WeightCopies:
    """Tensors made from parameters (low-precision casts, concatenations) and kept current: ``make(params)`` gives
    them, a list (of tensors, or of dicts / tuples holding tensors and None) in the order of ``slots``
    ((module, parameter name) pairs). ``current()`` refreshes them in place, keeping their memory, when a parameter's
    version counter moved (an optimizer step between two searches), and is False when a slot holds another
    parameter object than they were made from: whoever captured their addresses must make new ones. Checked once per
    token, so it only compares identities and counters."""

    def __init__(self, slots: list, make):
        self.slots, self.make = slots, make
        self.params = [mod._parameters[name] for mod, name in slots]
        self.versions = [p._version for p in self.params]
        with torch.no_grad():
            self.tensors = make(self.params)

    def current(self) -> bool:
        params = [mod._parameters[name] for mod, name in self.slots]
        if not all(map(operator.is_, params, self.params)):
            return False
        versions = [p._version for p in params]
        if versions != self.versions:
            with torch.no_grad():
                for old, new in zip(tree_leaves(self.tensors), tree_leaves(self.make(params))):
                    if old is not None:  # (an absent bias)
                        old.copy_(new)
            self.versions = versions
        return True


class Delegate:
    """The model interface of the search functions, but ``step``: the wrapped ``self.model``'s, unchanged."""

    def init_state(self, batch_size, memory=None, memory_padding_mask=None) -> dict:
        return self.model.init_state(batch_size, memory, memory_padding_mask)

    def prefill(self, tokens, state, key_padding_mask=None):
        return self.model.prefill(tokens, state, key_padding_mask)

    def reorder_state(self, state, index) -> dict:
        return self.model.reorder_state(state, index)

    def reserve_state(self, state, length):
        return self.model.reserve_state(state, length) if hasattr(self.model, "reserve_state") else state


class CUDAGraphs(Delegate):
    """``model`` (init_state / step / prefill / reorder_state, e.g. ``TransformerDecoder``) with ``step`` replayed
    from a CUDA graph where the state's shapes allow it (module docstring)."""

    def __init__(self, model, warmup: int = 2, fuse: bool = True):
        from .fused import Fused, unfusable
        if fuse and unfusable(model) is None:  # the step as a few fused kernels per layer (fused.py)
            model = Fused(model)
        self.model, self.warmup = model, warmup
        self.max_len = getattr(model, "max_len", None)
        self.graph, self.key = None, None
        self.casts = None  # WeightCopies: the low-precision copies of the weights only F.linear reads
        self.captures = 0

    def graphable(self, tokens, state, pad) -> bool:
        # a state whose shapes change every token says so (graph_step=False: top-k's and Reformer's caches); a KV
        # cache that can take the step (softmax's) only while it has room
        return (tokens.is_cuda and pad is None and "layers" in state
                and all(s.get("graph_step", True) for states in state["layers"] for s in states)
                and all(s["length"] + tokens.shape[1] <= s["k"].shape[2] for s in _caches(state)))

    def step(self, tokens: torch.Tensor, state: dict, pad=None) -> torch.Tensor:
        tokens = tokens.view(-1, 1)
        past_end = self.max_len is not None and state.get("pos", 0) + 1 > self.max_len
        if past_end or not self.graphable(tokens, state, pad):  # (the eager step names the length limit)
            return self.model.step(tokens, state, pad)
        leaves, dev = _leaves(state), tokens.device.type
        # the common case in a search: the state holds the graph's own buffers (the last step adopted them), so its
        # shapes are the captured ones and only the token shape and autocast need checking (host time per token)
        own = (self.graph is not None and tuple(tokens.shape) == self.key[0]
               and (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) == self.key[1:3]
               and len(leaves) == len(self.leaves) and all(map(operator.is_, leaves, self.leaves)))
        if not (own and self._casts_current()):
            key = _signature(state, tokens)
            if key != self.key or not self._casts_current():
                self._capture(tokens, state, key)
        self.tokens.copy_(tokens)
        self.pos.fill_(state["pos"])
        caches = _caches(state)
        if caches:  # (one length in a decoder's caches: every layer wrote every token)
            lengths = [s["length"] for s in caches]
            if len(set(lengths)) == 1:
                self.lengths.fill_(lengths[0])
            else:
                self.lengths.copy_(torch.tensor(lengths))
        if not own:
            _copy_into(self.leaves, leaves)
        self.graph.replay()
        if not own:
            self._adopt(state)
        for s in caches:
            s["length"] += tokens.shape[1]
        state["pos"] += 1
        return self.logits.clone()  # the buffer is overwritten by the next replay

    def _casts_current(self) -> bool:
        """Refresh the low-precision weight copies of any weight that changed; False when a module holds another
        parameter object than at capture (the graph must be captured again)."""
        sync = getattr(self.model, "sync_weights", None)  # Fused's own copies
        if sync is not None and not sync():
            return False
        return self.casts is None or self.casts.current()

    @contextlib.contextmanager
    def _low_weights(self):
        """The modules hold the low-precision copies (as Parameters on their storage) while the step is captured."""
        casts = [] if self.casts is None else list(zip(self.casts.slots, self.casts.tensors, self.casts.params))
        for (mod, name), low, _ in casts:
            mod._parameters[name] = torch.nn.Parameter(low, requires_grad=False)
        try:
            yield
        finally:
            for (mod, name), _, p in casts:
                mod._parameters[name] = p

    def _adopt(self, state: dict) -> None:
        """Point the caller's state at the graph's buffers, which now hold the advanced state (in place, as the
        search functions expect of ``step``)."""
        it = iter(self.leaves)
        for states in state["layers"]:
            for s in states:
                for k, v in s.items():
                    if torch.is_tensor(v) and k != "length":
                        s[k] = next(it)

    def _state(self, leaves: list, pos) -> dict:
        """A state of the captured structure holding ``leaves``, the caches' lengths read from ``self.lengths``."""
        it, lengths = iter(leaves), iter(self.lengths)
        return {"layers": [[type(s)({k: next(it) if v is _TENSOR else next(lengths) if v is _LENGTH else v
                                     for k, v in s.items()}) for s in states]
                           for states in self.template], "pos": pos}

    def _run(self) -> None:
        """The captured work: one eager step on a state made of the static buffers, its results copied back."""
        state = self._state(self.leaves, self.pos.clone())
        self.logits.copy_(self.model.step(self.tokens, state))
        _copy_into(self.leaves, _leaves(state))

    def _capture(self, tokens: torch.Tensor, state: dict, key: tuple) -> None:
        self.graph, self.casts = None, None
        self.template = [[type(s)({k: _LENGTH if k == "length" else _TENSOR if torch.is_tensor(v) else v
                                   for k, v in s.items()}) for s in states]
                         for states in state["layers"]]
        self.leaves = [v.clone() for v in _leaves(state)]
        self.tokens, self.pos = tokens.clone(), torch.tensor(state["pos"], device=tokens.device)
        self.lengths = torch.tensor([s["length"] for s in _caches(state)], dtype=torch.long, device=tokens.device)
        dev = tokens.device.type
        # Autocast caches the low-precision copies of the weights for the life of its context; a graph that read them
        # would read freed memory once that context ends. So the cache is off, and the linear weights' copies are ours.
        amp = torch.autocast(dev, torch.get_autocast_dtype(dev), cache_enabled=False) \
            if torch.is_autocast_enabled(dev) else contextlib.nullcontext()
        with torch.no_grad(), amp:
            saved = [v.clone() for v in self.leaves]
            # the output's shape and dtype, from a step on copies (a step may write its state in place); it also
            # finds the weights that only F.linear reads, which autocast casts on every call
            watch = _LinearOnly(self.model.parameters())
            with watch:
                self.logits = self.model.step(self.tokens, self._state([v.clone() for v in saved], state["pos"]))
            if torch.is_autocast_enabled(dev):
                ids, dtype = {id(p) for p in watch.result()}, torch.get_autocast_dtype(dev)

                def cast(params):  # one copy per parameter, also where two modules hold it
                    copies = {}
                    return [copies.setdefault(id(p), p.detach().to(dtype)) for p in params]
                self.casts = WeightCopies([(mod, name) for mod in self.model.modules()
                                           for name, p in mod._parameters.items() if p is not None and id(p) in ids],
                                          cast)
            with self._low_weights():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up outside the graph (lazy init, autotuning), as graphs need
                    for _ in range(self.warmup):
                        self._run()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._run()
            _copy_into(self.leaves, saved)  # capture and warm-up advanced the buffers: undo
        self.graph, self.key = graph, key
        self.captures += 1
