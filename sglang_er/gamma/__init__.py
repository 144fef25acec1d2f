"""When to speculate: the engine-free model behind each decode iteration's choice of γ.

The worker asks :class:`GammaChooser` for γ every iteration (through
:class:`~sglang_er.gamma.controller.Controller`) and feeds back measured phase times and accepted
lengths; everything here but the controller is plain Python (no SGLang, no torch: tensors are read
with ``.tolist()``), so the choice is testable and cheap to import. One module per concept:

* :mod:`~sglang_er.gamma.hardware_profile`: what a machine can do, as data, and its loaders;
* :mod:`~sglang_er.gamma.builtin_profiles`: datasheet profiles and which one a device starts on;
* :mod:`~sglang_er.gamma.roofline`: the one formula of a forward's predicted seconds;
* :mod:`~sglang_er.gamma.calibration` and :mod:`~sglang_er.gamma.robust_fit`: fitting a profile
  to timed forwards;
* :mod:`~sglang_er.gamma.model_cost`: bytes and flops of the target and its W4 drafter;
* :mod:`~sglang_er.gamma.batch`: the O(1) batch summary the cost model prices;
* :mod:`~sglang_er.gamma.cost_model`: predicted seconds per forward, from the profile;
* :mod:`~sglang_er.gamma.correction`: what live measurements teach the cost model;
* :mod:`~sglang_er.gamma.measured`: each γ's measured cost, preferred to the model where fresh;
* :mod:`~sglang_er.gamma.acceptance`: per-position acceptance and E[L|γ];
* :mod:`~sglang_er.gamma.choice`: γ* = argmax expected tokens/s, with hysteresis and exploration.

Units throughout: bytes, flop, seconds, tokens.
"""

from __future__ import annotations

from sglang_er.gamma.acceptance import AcceptanceModel, expected_lengths
from sglang_er.gamma.batch import BatchStats, batch_stats
from sglang_er.gamma.choice import EXPLORE_RUN, FORCED_EXPLORE_PERIODS, RETIME_ITERATIONS, Decision, GammaChooser
from sglang_er.gamma.correction import DRAFT_SETUP_MAX, DRAFT_SETUP_PRIOR, Correction, Observation
from sglang_er.gamma.cost_model import KV_READ_RULE, KV_TRAFFIC_FACTOR, CostModel, Work
from sglang_er.gamma.model_cost import ModelCost
from sglang_er.gamma.roofline import PHASES

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
    "Correction",
    "CostModel",
    "Decision",
    "GammaChooser",
    "ModelCost",
    "Observation",
    "Work",
    "batch_stats",
    "expected_lengths",
]
