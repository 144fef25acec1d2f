"""When to speculate: the engine-free model behind each decode iteration's choice of γ.

The worker asks :class:`GammaPolicy` for γ every iteration and feeds back measured phase times
and accepted lengths; everything here is plain Python (no SGLang, no torch: tensors are read
with ``.tolist()``), so the choice is testable and cheap to import. One module per concept:

* :mod:`~sglang_er.gamma.model_cost`: bytes and flops of the target and its W4 drafter;
* :mod:`~sglang_er.gamma.batch`: the O(1) batch summary the cost model prices;
* :mod:`~sglang_er.gamma.cost_model`: predicted seconds per forward, corrected live;
* :mod:`~sglang_er.gamma.acceptance`: per-position acceptance and E[L|γ];
* :mod:`~sglang_er.gamma.choice`: γ* = argmax expected tokens/s, with hysteresis and exploration.

Units throughout: bytes, flop, seconds, tokens.
"""

from __future__ import annotations

from sglang_er.gamma.acceptance import AcceptanceModel, expected_lengths
from sglang_er.gamma.batch import BatchStats, batch_stats
from sglang_er.gamma.choice import EXPLORE_RUN, FORCED_EXPLORE_PERIODS, RETIME_ITERATIONS, Decision, GammaPolicy
from sglang_er.gamma.cost_model import (
    DRAFT_SETUP_MAX,
    DRAFT_SETUP_PRIOR,
    KV_READ_RULE,
    KV_TRAFFIC_FACTOR,
    PHASES,
    CostModel,
    Observation,
    Work,
)
from sglang_er.gamma.model_cost import ModelCost

__all__ = [
    "DRAFT_SETUP_MAX",
    "DRAFT_SETUP_PRIOR",
    "EXPLORE_RUN",
    "FORCED_EXPLORE_PERIODS",
    "KV_READ_RULE",
    "KV_TRAFFIC_FACTOR",
    "PHASES",
    "RETIME_ITERATIONS",
    "AcceptanceModel",
    "BatchStats",
    "CostModel",
    "Decision",
    "GammaPolicy",
    "ModelCost",
    "Observation",
    "Work",
    "batch_stats",
    "expected_lengths",
]
