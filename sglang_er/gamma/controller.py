"""The thin adapter between the engine-free γ choice (:mod:`sglang_er.gamma`) and the worker.

Per decode iteration: read the batch's real sequence lengths, the prompt groups that share a
radix-cached prefix (GRPO's n samples of one prompt), and the request ids; ask the γ chooser for
γ; afterwards feed it the measured phase times and the accepted lengths, so the cost model and
the acceptance model follow this machine and this policy checkpoint.

Modes (env ``SGLANG_ER_MODE``): ``auto`` (default) chooses γ ∈ {0} ∪ 1..γmax every iteration;
``fixed`` uses ``SGLANG_ER_GAMMA`` (or γmax). A hardware profile comes from
``SGLANG_ER_PROFILE=path.json`` (see ``sglang-er calibrate``) or the built-in one for the device
(a GPU without one: the labelled ``generic-gpu`` placeholder, with a warning).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable

import torch

from sglang_er.gamma import KV_READ_RULE, AcceptanceModel, BatchStats, CostModel, GammaChooser, ModelCost, batch_stats
from sglang_er.gamma.builtin_profiles import builtin_profile_for_device
from sglang_er.gamma.hardware_profile import HardwareProfile, profile_from_env

logger = logging.getLogger(__name__)


def default_profile(device: torch.device) -> HardwareProfile:
    """``SGLANG_ER_PROFILE``, else the built-in profile of ``device``."""
    prof = profile_from_env(device.type)
    if prof is not None:
        return prof
    return builtin_profile_for_device(torch.cuda.get_device_name(device) if device.type == "cuda" else None)


class Controller:
    def __init__(
        self,
        hf_config: dict,
        gamma_max: int,
        device: torch.device,
        attention_backend: str,
        draft_head: str = "shared",
        draft_vocab: int = 0,
        profile: HardwareProfile | None = None,
        min_gain: float = 1.05,
        hysteresis: float = 0.02,
        explore_every: int = 32,
        tp_size: int = 1,
    ):
        self.device = device
        profile = profile or default_profile(device)
        # An unknown backend is modelled like the plain paged kernels: every request reads its own KV.
        cost = CostModel(
            profile,
            ModelCost.from_config(
                hf_config, w4_head=draft_head == "w4", w8_head=draft_head == "w8", draft_vocab=draft_vocab
            ).shard(tp_size),  # what one rank streams
            attention_backend=attention_backend,
            kv_read_rule=KV_READ_RULE.get(attention_backend, "per_request"),
        )
        self.acceptance = AcceptanceModel(gamma_max)
        self.chooser = GammaChooser(
            cost,
            self.acceptance,
            ladder=list(range(1, gamma_max + 1)),
            min_gain=min_gain,
            hysteresis=hysteresis,
            explore_every=explore_every,
        )
        self.cost = cost
        self._live_rids: set = set()
        self._rids: list = []  # the last batch's request ids, in order
        self._shared = 0  # its prompt groups' shared prefix tokens (recomputed when the batch changes)
        self.last_decision = None
        self._prev_gamma = None  # γ of the last iteration observed
        logger.info("EFFROLLOUT auto mode: profile %s, γ ladder 1..%d", profile.name, gamma_max)

    # ------------------------------------------------------------------ decision
    def choose(self, seq_lens: list[int], rids: list, prompt_keys: Callable[[], list[tuple[int, Hashable]]]) -> int:
        """γ for this iteration. seq_lens [B]: committed lengths; rids [B]: request ids;
        prompt_keys() -> [(prompt length, key)] per request, read only when the batch changed."""
        if rids != self._rids:  # the batch changed: requests left or joined
            self._forget_departed(rids)
            self._shared = shared_prefix_tokens(prompt_keys())
        st = batch_stats(seq_lens)
        if self._shared:
            st = BatchStats(st.batch, st.sum_len, st.max_len, self._shared)
        # summarised once: the feedback after the forwards reuses it (the decision's O(B) part)
        self._st, self._rids = st, rids
        self.last_decision = self.chooser.choose(st, rids)
        return self.last_decision.gamma

    def _forget_departed(self, rids) -> None:
        now = set(rids)
        for rid in self._live_rids - now:
            self.acceptance.forget(rid)
        self._live_rids = now

    # ------------------------------------------------------------------ measurements
    def observe(
        self,
        gamma: int,
        phases: dict[str, float],
        accept_lens=None,
        rows: list[int] | None = None,
        draft_split: tuple[float, float] | None = None,
    ) -> None:
        """Phase times (seconds) and accepted drafts [B] of the iteration ``choose`` decided;
        ``rows``: the requests whose drafts came from the W4 drafter (default: all);
        ``draft_split``: (first draft step, the other γ − 1) seconds, for γ ≥ 2.

        The first speculative iteration after a plain one is not timed: the target's forwards
        pushed the drafter's weights out of the caches, and its draft steps ran 1.5-2.5x a warm
        one's on gsm8k-lm at B = 8-32 (its acceptance counts all the same)."""
        cold = gamma > 0 and self._prev_gamma == 0
        self._prev_gamma = gamma
        if not cold:
            for phase, seconds in phases.items():
                self.cost.observe(phase, self._st, gamma, seconds)
            if draft_split is not None:
                self.cost.correction.observe_draft_setup(*draft_split, gamma)
            # the whole batch through the iteration's usual forwards (not a history-only verify)
            if (phases.keys() == {"plain"} if gamma == 0 else phases.keys() == {"draft", "verify"}) and (
                rows is None or len(rows) == self._st.batch
            ):
                self.chooser.observe_forwards(self._st, gamma, sum(phases.values()))
        if gamma > 0 and accept_lens is not None:
            lens, rids = accept_lens.tolist(), self._rids
            if rows is not None:
                lens, rids = [lens[i] for i in rows], [rids[i] for i in rows]
            if lens:
                self.acceptance.observe(gamma, lens, rids)

    def observe_outside(self, gamma: int, batch: int, seconds: float) -> None:
        """Scheduler time around the last iteration's forwards (see :meth:`Correction.observe_outside`
        and :meth:`GammaChooser.observe_outside`)."""
        self.cost.correction.observe_outside(gamma, batch, seconds)
        self.chooser.observe_outside(gamma, batch, seconds)

    def drafter_changed(self) -> None:
        """The drafter was re-quantized: its acceptance must be measured afresh."""
        self.acceptance.reset()
        self.chooser.reset()

    def w4_expected_tokens(self) -> list[float]:
        """E[L | W4, γ] for γ = 0..γmax (server-wide acceptance)."""
        return self.acceptance.expected_tokens_table()

    def verify_only_gain(self, gamma: int, expected_tokens: float) -> float:
        """Predicted tokens/s of a verify-only iteration (drafts that cost no forward) of width
        γ+1 committing ``expected_tokens``, over ``min_gain`` times a plain decode step's, for the
        batch ``choose`` last saw. It pays above 1."""
        st, cost = self._st, self.cost
        t_v = cost.t_verify(st, gamma) + cost.correction.t_outside(gamma, st.batch)
        t_t = cost.t_plain(st) + cost.correction.t_outside(0, st.batch)
        return expected_tokens / t_v / (self.chooser.min_gain * st.batch / t_t)

    def state(self) -> dict:
        d, correction = self.last_decision, self.cost.correction
        return {
            "profile": self.cost.profile.name,
            "alphas": self.acceptance.alphas(),
            # JSON has no NaN (an empty window): report it as null
            "model_error": {
                p: {k: (v if v == v else None) for k, v in e.items()} for p, e in correction.error_stats().items()
            },
            "last_decision": None if d is None else {"gamma": d.gamma, "reason": d.reason},
            "outside_s": correction.outside_fit,  # per mode (a, b): a + b·batch seconds
            "draft_setup_steps": correction.draft_setup,  # κ: the first draft step's extra, in steps
        }


def shared_prefix_tokens(prompt_keys: list[tuple[int, Hashable]]) -> int:
    """:attr:`BatchStats.shared_tokens`: requests with the same prompt share its KV pages through
    the radix cache, so each group's prompt is read once (``(length, key)`` per request)."""
    groups = Counter(prompt_keys)
    return sum(key[0] * (n - 1) for key, n in groups.items())
