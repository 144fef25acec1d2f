"""Planted bugs for the distribution tests, in the test servers that want one (``helpers.FaultSwitch``).

``SGLANG_ER_TEST_FAULT_FILE=path`` names a file holding the fault planted now, read at every call,
empty for none, so a test switches a bug on and off in a running server (``helpers.FaultSwitch``)
instead of starting a second server for it. The faults: ``accept_all``, every draft is accepted;
``accept_all_history``, every history draft is; ``no_residual``, after a rejection the token is
drawn from p instead of norm(max(p - q, 0)) (the subtle bug: acceptance rates stay right). Not
lossless on purpose, so the distribution tests can show they detect a wrong rule. And
``stale_drafter``: weight updates leave the drafter on the weights it was built from (lossless,
but it drafts the old policy).
The product has no such setting: this module patches the worker as it is imported, in every
process Python starts with ``tests/hooks`` on its path (SGLang's scheduler included).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

FAULT_FILE = os.environ.get("SGLANG_ER_TEST_FAULT_FILE")
WORKER = "sglang_er.engine.worker"
FAULTS = ("accept_all", "accept_all_history", "no_residual", "stale_drafter")


def _planted() -> str:
    """The fault planted now ('' for none): one read of the file per patched call."""
    with open(FAULT_FILE) as f:
        now = f.read().strip()
    if now and now not in FAULTS:
        raise ValueError(f"{FAULT_FILE} says {now!r}: use one of {', '.join(FAULTS)}")
    return now


def _plant(module) -> None:
    import torch

    from sglang_er import sampler
    from sglang_er.history.proposer import HISTORY_SOURCES

    honest_update = module.EffRolloutWorker.on_weights_updated

    def keep_the_old_drafter(self):
        if _planted() != "stale_drafter":
            return honest_update(self)
        self._kv = None

    module.EffRolloutWorker.on_weights_updated = keep_the_old_drafter

    honest_rule = sampler.verify

    def verify_without_residual(draft_tokens, q, p, generator=None):
        accept_len, tokens = honest_rule(draft_tokens, q, p, generator)
        if _planted() != "no_residual":
            return accept_len, tokens
        rows = torch.nonzero(accept_len < draft_tokens.shape[1]).flatten()
        at = accept_len[rows]
        tokens[rows, at] = sampler.sample(p[rows, at])
        return accept_len, tokens

    sampler.verify = verify_without_residual

    honest = module.EffRolloutWorker._commit

    def commit_accepting_all(self, batch, it, drafts, v, plan, clock):
        fault = _planted()
        if fault not in ("accept_all", "accept_all_history"):
            return honest(self, batch, it, drafts, v, plan, clock)
        rows = torch.ones_like(v.accept_len, dtype=torch.bool)
        if fault == "accept_all_history":
            history = [s in HISTORY_SOURCES for s in plan.source] if plan is not None else [False] * it.bs
            rows = torch.tensor(history, device=rows.device)
        p = sampler.target_probs(v.logits, it.params)
        forced = torch.cat([drafts.tokens, sampler.sample(p[:, it.gamma])[:, None]], 1)
        v.accept_len = torch.where(rows, torch.full_like(v.accept_len, it.gamma), v.accept_len)
        v.tokens = torch.where(rows[:, None], forced, v.tokens)
        return honest(self, batch, it, drafts, v, plan, clock)

    module.EffRolloutWorker._commit = commit_accepting_all


class _PatchWorkerOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != WORKER:
            return None
        sys.meta_path.remove(self)  # find the real module, once
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _plant(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if FAULT_FILE is not None:
        sys.meta_path.insert(0, _PatchWorkerOnImport())
