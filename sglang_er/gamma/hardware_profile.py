"""Hardware profiles: what the machine can do, as data, and the one way to read them.

A :class:`HardwareProfile` holds the handful of numbers the roofline
(:mod:`sglang_er.gamma.roofline`) needs:

* ``bandwidth_bytes_per_s``: effective peak memory bandwidth BW (bytes/s);
* ``flops_per_s``: effective peak compute F (flop/s) per dtype class: ``bf16``, ``fp16``,
  ``fp32`` and ``w4`` (a 4-bit weight-only matmul: dequantize + bf16 FMA);
* per-forward fixed overheads (s): ``fixed_plain_s`` (one SGLang decode forward),
  ``fixed_draft_step_s`` (one lean drafter step), ``fixed_verify_s`` (one SGLang verify forward);
* per-sequence overheads (s per request per forward): ``per_seq_s`` for target forwards,
  ``per_seq_draft_s`` for drafter steps;
* metadata: ``name``, ``device``, ``measured_with``, ``attention_backend``, fit diagnostics.

Profiles are JSON, read strictly as data (``json`` + pydantic, never ``eval``/``pickle``):
unknown fields, wrong types, NaN/inf, out-of-range values, a different schema version or a
profile measured on another device are refused with a ``ValueError`` that names the problem.
:func:`load_profile` (a file) and :func:`profile_from_env` (``SGLANG_ER_PROFILE``) are the only
loaders. The built-in profiles are in :mod:`sglang_er.gamma.builtin_profiles`; fitting one to
measurements is :mod:`sglang_er.gamma.calibration` and :mod:`sglang_er.gamma.robust_fit`.

This module does not import SGLang (nor torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["PROFILE_ENV", "SCHEMA_VERSION", "ComputeClass", "HardwareProfile", "load_profile", "profile_from_env"]

SCHEMA_VERSION = 1
ComputeClass = Literal["bf16", "fp16", "fp32", "w4"]

# Plausibility bounds: wide enough for a laptop CPU and a future accelerator, narrow enough to
# catch unit mistakes (GB/s written as bytes/s, milliseconds written as seconds).
_BW_RANGE = (1e8, 1e14)  # bytes/s: 100 MB/s .. 100 TB/s
_F_RANGE = (1e8, 1e17)  # flop/s: 0.1 GFLOP/s .. 100 PFLOP/s
_FIXED_MAX_S = 1.0  # a per-forward overhead above 1 s is a unit error, not a machine
_PER_SEQ_MAX_S = 0.1
_MAX_PROFILE_BYTES = 1 << 20  # a profile is a few hundred bytes; refuse to slurp huge files
PROFILE_ENV = "SGLANG_ER_PROFILE"  # a profile JSON for the server (`sglang-er calibrate --out`)


def _norm_device(name: str) -> str:
    return " ".join(name.lower().split())


class HardwareProfile(BaseModel):
    """One machine's roofline parameters. Units: bytes, flop, seconds. Immutable.

    Build with the constructor, :func:`~sglang_er.gamma.builtin_profiles.builtin_profile`,
    :meth:`load` / :meth:`from_json` or :func:`~sglang_er.gamma.calibration.fit_profile`; persist
    with :meth:`save` / :meth:`to_json`.
    """

    # strict: "16e9" (a string) is not a number; forbid: a misspelt field is an error, not
    # silently ignored; no inf/nan: JSON's Infinity/NaN extensions are refused.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1, max_length=200)
    device: str = Field(min_length=1, max_length=200)
    measured_with: str = Field("", max_length=2000)

    bandwidth_bytes_per_s: float = Field(ge=_BW_RANGE[0], le=_BW_RANGE[1])
    flops_per_s: dict[ComputeClass, float]

    fixed_plain_s: float = Field(ge=0.0, le=_FIXED_MAX_S)
    fixed_draft_step_s: float = Field(ge=0.0, le=_FIXED_MAX_S)
    fixed_verify_s: float = Field(ge=0.0, le=_FIXED_MAX_S)
    per_seq_s: float = Field(0.0, ge=0.0, le=_PER_SEQ_MAX_S)
    per_seq_draft_s: float = Field(0.0, ge=0.0, le=_PER_SEQ_MAX_S)

    # The SGLang attention backend the overheads were measured with; the cost model derives
    # its KV read rule from it (sglang_er.gamma.cost_model.KV_READ_RULE) unless told otherwise.
    attention_backend: str = Field("torch_native", min_length=1, max_length=100)
    # Filled by fit_profile: relative RMS error of the fit and which parameters the samples
    # determined (the others were taken from the base profile).
    fit_rel_rms: float | None = Field(None, ge=0.0)
    fitted: list[str] = Field(default_factory=list)
    # Parameters the sweep could not determine, held at a stated value (``sglang-er calibrate``
    # says which value and why); the mean absolute error of a fit on part of the sweep on the rows
    # it did not see, per sweep mode; and ``forced``: the fit missed the quality bounds and was
    # written anyway (``--force``), so its predictions are not to be trusted.
    held: list[str] = Field(default_factory=list)
    fit_holdout_mape: dict[str, float] | None = None
    forced: bool = False

    @field_validator("flops_per_s")
    @classmethod
    def _check_flops(cls, v: dict) -> dict:
        if "bf16" not in v:
            raise ValueError("must contain 'bf16' (the target's compute class)")
        for k, f in v.items():
            if not (_F_RANGE[0] <= f <= _F_RANGE[1]):
                raise ValueError(
                    f"{k}: {f:g} flop/s is outside the plausible range [{_F_RANGE[0]:g}, {_F_RANGE[1]:g}] (unit error?)"
                )
        return v

    @model_validator(mode="after")
    def _check_ridge(self):
        # Ridge point F/BW in flop/byte: real devices sit between a few (CPUs: 2e11 / 16e9 = 12.5)
        # and a few hundred (H100: 295). Below 0.5 or above 1e4, BW and F were almost certainly
        # swapped or mis-scaled.
        ridge = self.flops_per_s["bf16"] / self.bandwidth_bytes_per_s
        if not 0.5 <= ridge <= 1e4:
            raise ValueError(
                f"bf16 flop/s ÷ bandwidth = {ridge:g} flop/byte is implausible (expected 0.5..1e4); "
                "check the units of bandwidth_bytes_per_s (bytes/s) and flops_per_s (flop/s)"
            )
        return self

    # ------------------------------------------------------------------ helpers
    def flops(self, compute_class: str) -> float:
        """flop/s for ``compute_class``; a class the profile lacks falls back to ``bf16``."""
        return self.flops_per_s.get(compute_class, self.flops_per_s["bf16"])

    def check_device(self, device: str) -> None:
        """Raise ValueError if this profile was measured on a different device than ``device``."""
        if _norm_device(device) != _norm_device(self.device):
            raise ValueError(
                f"hardware profile {self.name!r} was measured on {self.device!r} but this machine is "
                f"{device!r}; recalibrate on this machine or pass the profile that matches it"
            )

    # ------------------------------------------------------------------ JSON I/O
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<string>", device: str | None = None) -> HardwareProfile:
        """Parse a profile from JSON text (data only). ``device``: refuse a profile of another device."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"hardware profile {source}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"hardware profile {source}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"hardware profile {source}: schema_version {version!r} is not supported "
                f"(this sglang-er reads version {SCHEMA_VERSION}); recalibrate"
            )
        try:
            prof = cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
            )
            raise ValueError(f"hardware profile {source} is invalid: {problems}") from None
        if device is not None:
            prof.check_device(device)
        return prof

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> HardwareProfile:
        """Read a profile file. Raises ValueError (never executes anything in it)."""
        p = Path(path)
        try:
            size = p.stat().st_size
        except OSError as e:
            raise ValueError(f"hardware profile {p}: cannot read ({e.strerror})") from None
        if size > _MAX_PROFILE_BYTES:
            raise ValueError(f"hardware profile {p}: {size} bytes is too large for a profile")
        return cls.from_json(p.read_bytes(), source=str(p), device=device)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(p)  # atomic: a crash never leaves a half-written profile behind
        return p


# ---------------------------------------------------------------------- loading
_LOAD_FIX = "pass a profile JSON written by `sglang-er calibrate --out`, or recalibrate"


def load_profile(path: str | Path, *, fix: str = _LOAD_FIX, context: str = "") -> HardwareProfile:
    """:meth:`HardwareProfile.load` whose ValueError starts with ``context`` (where the path came
    from) and ends with how to fix it (``fix``)."""
    try:
        return HardwareProfile.load(path)
    except ValueError as e:
        raise ValueError(f"{context}{e}. Fix: {fix}") from None


def profile_from_env(server: str, environ: Mapping[str, str] | None = None) -> HardwareProfile | None:
    """The profile ``SGLANG_ER_PROFILE`` names (None when unset), for a server on ``server``
    (``"cpu"``, ``"cuda"``, ...: a device type). Raises ValueError naming the variable and the fix
    when the file is bad or was measured on the other kind of machine: a profile measured on a
    CPU drives a GPU server into wrong decisions, and vice versa."""
    path = (os.environ if environ is None else environ).get(PROFILE_ENV)
    if not path:
        return None
    prof = load_profile(
        path,
        context=f"{PROFILE_ENV}={path}: ",
        fix=f"fix the file, re-create it with `sglang-er calibrate`, or unset {PROFILE_ENV}",
    )
    server = server.split(":")[0].lower()
    if (server == "cpu") != prof.device.lower().startswith("cpu"):
        raise ValueError(
            f"{PROFILE_ENV}={path}: profile {prof.name!r} was measured on {prof.device!r} but this server "
            f"runs on {server}; calibrate this machine (`sglang-er calibrate --model-path M --out profile.json`) "
            f"or unset {PROFILE_ENV}"
        )
    return prof
