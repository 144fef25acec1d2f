"""Activation statistics for AWQ from the target's own forwards (prefill and verify).

The drafter's AWQ scales need mean |x| per input channel of every quantized linear. The
server computes exactly those inputs anyway, in every prefill and verify pass, so forward
pre-hooks on the target's four linears of each layer feed them to the
:class:`~sglang_er.quant.awq.AWQQuantizer`, at bounded cost:

- the hooks do nothing unless the worker opens a sampling window (:meth:`LiveStats.window`),
  which it does on every ``sample_every``-th target forward;
- each observation keeps at most ``max_tokens`` random rows (device ops only, no host sync);
- never while a CUDA graph is being captured.

The statistics describe the data, not the weights, so they survive weight updates; they
decay slowly (:class:`~sglang_er.quant.awq.ActivationStats`).
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from sglang_er.draft.views import ModelView
from sglang_er.quant.awq import LINEAR_GROUPS, AWQQuantizer


class LiveStats:
    def __init__(self, view: ModelView, awq: AWQQuantizer, sample_every: int = 4):
        self.awq = awq
        self.sample_every = max(1, int(sample_every))
        self.forwards = 0
        self.sampled = 0
        self._active = False
        self._handles = [
            lv.linears[group].register_forward_pre_hook(partial(self._hook, i, group))
            for i, lv in enumerate(view.layers)
            for group in LINEAR_GROUPS
        ]

    def _hook(self, layer: int, group: str, _module, args):
        if self._active:
            self.awq.observe(layer, group, args[0].detach())

    @contextlib.contextmanager
    def window(self):
        """Wrap one target forward; observes it on every ``sample_every``-th call."""
        self.forwards += 1
        take = self.forwards % self.sample_every == 1 % self.sample_every and not _capturing()
        self._active = take
        try:
            yield
        finally:
            self._active = False
            self.sampled += take

    def ready(self, num_layers: int) -> bool:
        """Every (layer, group) has enough tokens for an AWQ search."""
        return all(self.awq.ready(i, g) for i in range(num_layers) for g in LINEAR_GROUPS)

    def tokens(self) -> int:
        """Fewest rows seen by any (layer, group): what the cold-start threshold waits for."""
        stats = self.awq.stats.values()
        return min((st.tokens_used for st in stats), default=0)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
