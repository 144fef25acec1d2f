"""EFFROLLOUT settings: parsed as data (pydantic), from server args and ``SGLANG_ER_*`` env vars.

SGLang's CLI cannot be extended by a plugin without patching its parser, so the knobs that
have no SGLang flag are environment variables, read in every SGLang process alike:

- ``SGLANG_ER_GAMMA``: a fixed γ (``0`` = plain decoding) or a comma list cycled per
  iteration (``"3,0,1"``; used to prove that switching γ costs nothing and stays lossless).
  Unset: γ = the server's ``--speculative-num-draft-tokens`` − 1.
- ``SGLANG_ER_MODE``: ``auto`` (default: γ chosen every iteration by the system-aware γ chooser),
  ``fixed`` (setting ``SGLANG_ER_GAMMA`` implies it) or ``off`` (always γ = 0: plain decoding
  through the worker, the drafter kept and re-quantized so that switching back costs nothing).
- ``SGLANG_ER_DRAFT_HEAD``: ``auto`` , ``shared``
  (the target's lm_head), ``w8`` (an int8 copy) or ``w4`` (a 4-bit copy); ``auto`` means ``w8``
  only where its kernel exists (CPU, bf16 model).
- ``SGLANG_ER_DRAFT_VOCAB``: the draft head scores only this many tokens, the most frequent in the
  server's own traffic (:mod:`sglang_er.draft.vocab`; 32768 by default, so a vocabulary of at most
  that many is scored whole); ``0`` scores every token.
- ``SGLANG_ER_QUANT``: ``awq`` (default: activation-aware scales from live traffic, RTN until
  ``SGLANG_ER_AWQ_MIN_TOKENS`` tokens (512) were observed) or ``rtn``;
  ``SGLANG_ER_AWQ_SAMPLE_EVERY``: observe every N-th prefill/verify forward (4).
- ``SGLANG_ER_HISTORY``: history drafts next to the W4 drafter (:mod:`sglang_er.history.proposer`):
  ``off`` (default), ``group`` (the prompt and its in-flight samples) or ``all`` (also finished
  requests with the same prompt: earlier epochs); ``SGLANG_ER_HISTORY_MIN_MATCH`` (3) tokens a
  match needs, ``SGLANG_ER_HISTORY_BUDGET`` (4,000,000) indexed tokens before the least recently
  used prompt is dropped.
- ``SGLANG_ER_MIN_GAIN``: predicted speed-up over plain decoding that speculation (W4 or a
  verify-only history iteration) must reach in ``auto`` mode (1.05: the live-corrected cost
  model is off by 7–10% per phase on a CPU, and a wrong "on" costs more than a missed 1.0x–1.05x);
  ``SGLANG_ER_HYSTERESIS``: relative gain a new γ needs over the previous one (0.02);
  ``SGLANG_ER_EXPLORE_EVERY``: iterations of one kind (plain, or speculating) after which auto
  runs the other for two iterations, the second timed, to re-measure it (32; doubled, up to 8x,
  after each exploration of speculation that left plain chosen; ``0``: never, every decision the
  cost model's).
- ``SGLANG_ER_TIMELINE``: iterations kept in the timeline ``/get_server_info`` returns (2048).
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from sglang_er.limits import MAX_GAMMA

# field -> the variable that sets it (from_env reads them; errors name them)
_ENV = {
    "mode": "SGLANG_ER_MODE",
    "draft_head": "SGLANG_ER_DRAFT_HEAD",
    "draft_vocab": "SGLANG_ER_DRAFT_VOCAB",
    "quant": "SGLANG_ER_QUANT",
    "awq_min_tokens": "SGLANG_ER_AWQ_MIN_TOKENS",
    "awq_sample_every": "SGLANG_ER_AWQ_SAMPLE_EVERY",
    "timeline_size": "SGLANG_ER_TIMELINE",
    "min_gain": "SGLANG_ER_MIN_GAIN",
    "hysteresis": "SGLANG_ER_HYSTERESIS",
    "explore_every": "SGLANG_ER_EXPLORE_EVERY",
    "history": "SGLANG_ER_HISTORY",
    "history_min_match": "SGLANG_ER_HISTORY_MIN_MATCH",
    "history_budget": "SGLANG_ER_HISTORY_BUDGET",
}
DEFAULT_GAMMA = 8


class EffRolloutConfig(BaseModel):
    gamma_max: int = Field(DEFAULT_GAMMA, ge=1, le=MAX_GAMMA)
    gamma_schedule: list[int] | None = None  # None: always gamma_max
    mode: Literal["auto", "fixed", "off"] = "auto"
    draft_head: Literal["auto", "shared", "w8", "w4"] = "auto"
    draft_vocab: int = Field(32768, ge=0)
    quant: Literal["awq", "rtn"] = "awq"
    awq_min_tokens: int = Field(512, ge=1)
    awq_sample_every: int = Field(4, ge=1)
    timeline_size: int = Field(2048, ge=0, le=1 << 20)
    min_gain: float = Field(1.05, ge=1.0, le=4.0)
    hysteresis: float = Field(0.02, ge=0.0, le=1.0)
    # auto: re-measure what the γ choice rejects (see GammaChooser._explore); 0 turns that off,
    # leaving every decision to the cost model (tests of the model's own verdict)
    explore_every: int = Field(32, ge=0, le=1 << 16)
    history: Literal["off", "group", "all"] = "off"
    history_min_match: int = Field(3, ge=1, le=64)
    history_budget: int = Field(4_000_000, ge=1000)

    @field_validator("gamma_schedule")
    @classmethod
    def _nonempty(cls, v):
        if v is not None and not v:
            raise ValueError("empty γ schedule")
        return v

    def resolved_head(self, device_type: str, dtype) -> str:
        """``auto``: the int8 head where its kernel exists (CPU, bf16), else the shared head."""
        if self.draft_head != "auto":
            return self.draft_head
        import torch

        return "w8" if device_type == "cpu" and dtype == torch.bfloat16 else "shared"

    def gamma_for_iteration(self, it: int) -> int:
        if self.mode == "off":
            return 0
        if self.gamma_schedule is None:
            return self.gamma_max
        return self.gamma_schedule[it % len(self.gamma_schedule)]

    @classmethod
    def from_env(cls, gamma_max: int, environ=os.environ) -> EffRolloutConfig:
        raw = environ.get("SGLANG_ER_GAMMA", "").strip()
        schedule = None
        if raw:
            try:
                schedule = [int(x) for x in raw.split(",")]
            except ValueError:
                raise ValueError(
                    f"SGLANG_ER_GAMMA={raw!r} is not an integer or a comma list of integers; "
                    f"set e.g. SGLANG_ER_GAMMA=3 or SGLANG_ER_GAMMA=3,0,1"
                ) from None
            bad = [g for g in schedule if not 0 <= g <= gamma_max]
            if bad:
                raise ValueError(
                    f"SGLANG_ER_GAMMA={raw!r}: γ must lie in 0..{gamma_max} (the server's "
                    f"--speculative-num-draft-tokens − 1); raise --speculative-num-draft-tokens or lower γ"
                )
        try:
            mode = environ.get("SGLANG_ER_MODE") or ("fixed" if schedule else "auto")
            if mode in ("auto", "off") and schedule:
                raise ValueError(f"SGLANG_ER_GAMMA fixes γ: drop it or set SGLANG_ER_MODE=fixed, not {mode}")
            # unset or empty variables take the field's default
            set_vars = {field: environ[var] for field, var in _ENV.items() if field != "mode" and environ.get(var)}
            return cls(gamma_max=gamma_max, gamma_schedule=schedule, mode=mode, **set_vars)
        except ValidationError as e:
            # name the variable to change, not the pydantic field
            why = "; ".join(
                f"{_ENV.get(str(err['loc'][0]), err['loc'][0]) if err['loc'] else 'settings'}"
                f"={err.get('input')!r}: {err['msg']}"
                for err in e.errors()
            )
            raise ValueError(f"invalid EFFROLLOUT settings: {why}") from None
