"""EFFROLLOUT state in SGLang's own server-info mechanism.

``GET /get_server_info`` returns each scheduler's internal state under ``internal_states``; an
AFTER hook on the speculative contribution to that state adds ``effrollout``: the worker's
counters (:meth:`SpecMetrics.snapshot`), its settings, the re-quantization count and time, and
the per-iteration timeline (:class:`~sglang_er.metrics.Timeline`). Read-only, so it needs no
admin key; SGLang's ``--api-key`` protects the endpoint like any other.
"""

from __future__ import annotations

import weakref

_workers: weakref.WeakSet = weakref.WeakSet()


def track(worker) -> None:
    """Register a live worker (it exposes ``state() -> dict`` and ``on_weights_updated()``)."""
    _workers.add(worker)


def workers() -> list:
    return list(_workers)


def add_effrollout(_result, _controller, state, *args, **kwargs):
    live = workers()
    if live:
        state["effrollout"] = live[0].state()
    return _result
