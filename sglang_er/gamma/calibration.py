"""Hardware profiles for the EFFROLLOUT cost model: what the machine can do, as data.

A :class:`HardwareProfile` holds the handful of numbers the roofline cost model in
:mod:`sglang_er.gamma.cost_model` needs:

* ``bandwidth_bytes_per_s``: effective peak memory bandwidth BW (bytes/s);
* ``flops_per_s``: effective peak compute F (flop/s) per dtype class: ``bf16``, ``fp16``,
  ``fp32`` and ``w4`` (a 4-bit weight-only matmul: dequantize + bf16 FMA);
* per-forward fixed overheads (s): ``fixed_plain_s`` (one SGLang decode forward),
  ``fixed_draft_step_s`` (one lean drafter step), ``fixed_verify_s`` (one SGLang verify forward);
* per-sequence overheads (s per request per forward): ``per_seq_s`` for target forwards,
  ``per_seq_draft_s`` for drafter steps;
* metadata: ``name``, ``device``, ``measured_with``, ``attention_backend``, fit diagnostics.

A phase's predicted time is ``max(bytes / BW, Σ_class flops_class / F_class) + per_seq · B +
fixed``, written once in :func:`roofline_seconds`: the cost model's predictions
(:class:`sglang_er.gamma.cost_model.CostModel`; its per-iteration hot path inlines it, kept equal
by a test), :func:`fit_profile` and the ``sglang-er calibrate`` residuals all call it.

Profiles are JSON, read strictly as data (``json`` + pydantic, never ``eval``/``pickle``):
unknown fields, wrong types, NaN/inf, out-of-range values, a different schema version or a
profile measured on another device are refused with a ``ValueError`` that names the problem.
:func:`load_profile` (a file) and :func:`profile_from_env` (``SGLANG_ER_PROFILE``) are the only
loaders; :func:`builtin_profile_for_device` picks the built-in one for a device: datasheet numbers
(peak memory bandwidth, dense bf16 TFLOP/s) for the A100, H100, H200 and L40S variants, matched on
``torch.cuda.get_device_name`` per SKU and labelled as such; any other GPU gets the labelled
``generic-gpu`` placeholder and a warning to run ``sglang-er calibrate``, never another GPU's numbers.

:func:`fit_profile` estimates BW, F and the overheads from clean samples
(phase, bytes, flops, batch, seconds) by non-negative least squares on that roofline form;
``sglang-er calibrate`` uses the bounded, validated fit of :mod:`sglang_er.gamma.robust_fit`.

This module does not import SGLang (nor torch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "BUILTIN_PROFILES",
    "GENERIC_GPU",
    "PROFILE_ENV",
    "SCHEMA_VERSION",
    "CalibrationSample",
    "HardwareProfile",
    "builtin_profile",
    "builtin_profile_for_device",
    "compute_seconds",
    "fit_profile",
    "gpu_profile_name",
    "load_profile",
    "phase_seconds",
    "profile_from_env",
    "roofline_seconds",
    "sample_seconds",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ComputeClass = Literal["bf16", "fp16", "fp32", "w4"]
Phase = Literal["plain", "draft", "verify"]

# Plausibility bounds: wide enough for a laptop CPU and a future accelerator, narrow enough to
# catch unit mistakes (GB/s written as bytes/s, milliseconds written as seconds).
_BW_RANGE = (1e8, 1e14)  # bytes/s: 100 MB/s .. 100 TB/s
_F_RANGE = (1e8, 1e17)  # flop/s: 0.1 GFLOP/s .. 100 PFLOP/s
_FIXED_MAX_S = 1.0  # a per-forward overhead above 1 s is a unit error, not a machine
_PER_SEQ_MAX_S = 0.1
_MAX_PROFILE_BYTES = 1 << 20  # a profile is a few hundred bytes; refuse to slurp huge files
PROFILE_ENV = "SGLANG_ER_PROFILE"  # a profile JSON for the server (`sglang-er calibrate --out`)
GENERIC_GPU = "generic-gpu"  # the built-in placeholder of a GPU that has no profile of its own


def _norm_device(name: str) -> str:
    return " ".join(name.lower().split())


class HardwareProfile(BaseModel):
    """One machine's roofline parameters. Units: bytes, flop, seconds. Immutable.

    Build with the constructor, :func:`builtin_profile`, :meth:`load` / :meth:`from_json`
    or :func:`fit_profile`; persist with :meth:`save` / :meth:`to_json`.
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


# ---------------------------------------------------------------------- built-in defaults
_PUBLIC_SPEC = (
    "built-in from public specifications (peak memory bandwidth, dense bf16 tensor TFLOP/s; w4 assumed "
    "0.7x bf16; overheads assumed), corrected online; `sglang-er calibrate` measures this GPU"
)


def _gpu(name: str, device: str, bw: float, bf16: float, fp32: float, fixed_ms: tuple, per_seq_us: tuple):
    """A GPU's built-in profile from its datasheet: peak bandwidth (bytes/s), dense bf16 and fp32
    flop/s. The overheads (ms: plain, draft step, verify; µs per request: target, draft) are
    assumptions of a graph-captured decode step, which live correction replaces within tens of steps."""
    return HardwareProfile(
        name=name,
        device=device,
        measured_with=_PUBLIC_SPEC,
        bandwidth_bytes_per_s=bw,
        flops_per_s={"bf16": bf16, "fp16": bf16, "fp32": fp32, "w4": round(0.7 * bf16, -12)},
        fixed_plain_s=fixed_ms[0] * 1e-3,
        fixed_draft_step_s=fixed_ms[1] * 1e-3,
        fixed_verify_s=fixed_ms[2] * 1e-3,
        per_seq_s=per_seq_us[0] * 1e-6,
        per_seq_draft_s=per_seq_us[1] * 1e-6,
        attention_backend="flashinfer",
    )


_HOPPER = ((1.0, 0.15, 1.2), (2.0, 0.5))  # overheads of a Hopper decode step (assumed)
_AMPERE = ((1.2, 0.2, 1.4), (2.5, 0.6))  # Ampere / Ada (assumed)
BUILTIN_PROFILES: dict[str, HardwareProfile] = {
    # A 2-core CPU box running SGLang on the portable CPU platform (torch_native attention).
    # BW is the *effective* streaming bandwidth a bf16 GEMV reaches, not the DIMM peak;
    # 19 ms is the measured fixed cost of one SGLang decode forward (scheduler, metadata,
    # Python per layer); the lean drafter loop skips most of that (~1 ms).
    "cpu-2core": HardwareProfile(
        name="cpu-2core",
        device="cpu-2core",
        measured_with="built-in default (SGLang 0.5.23 portable_cpu, torch_native, 2 cores)",
        bandwidth_bytes_per_s=16e9,
        flops_per_s={"bf16": 2e11, "fp16": 5e10, "fp32": 1e11, "w4": 1e11},  # w4: dequant ~halves FMA rate (assumed)
        fixed_plain_s=19e-3,
        fixed_draft_step_s=1e-3,
        fixed_verify_s=20e-3,  # an extend-mode forward builds a little more metadata than decode
        per_seq_s=0.3e-3,  # torch_native loops over requests in Python in every layer
        per_seq_draft_s=0.02e-3,  # the drafter's attention is batched; only sampling is per request
        attention_backend="torch_native",
    ),
    # Datasheet numbers (dense, no sparsity): bandwidth bytes/s, bf16 and fp32 flop/s.
    "h100-sxm": _gpu("h100-sxm", "NVIDIA H100 80GB HBM3", 3.35e12, 989e12, 67e12, *_HOPPER),
    "h100-pcie": _gpu("h100-pcie", "NVIDIA H100 PCIe", 2.0e12, 756e12, 51e12, *_HOPPER),
    "h100-nvl": _gpu("h100-nvl", "NVIDIA H100 NVL", 3.9e12, 835e12, 60e12, *_HOPPER),
    "h200": _gpu("h200", "NVIDIA H200", 4.8e12, 989e12, 67e12, *_HOPPER),
    "h200-nvl": _gpu("h200-nvl", "NVIDIA H200 NVL", 4.8e12, 835e12, 60e12, *_HOPPER),
    "a100-80gb": _gpu("a100-80gb", "NVIDIA A100-SXM4-80GB", 2.039e12, 312e12, 19.5e12, *_AMPERE),
    "a100-80gb-pcie": _gpu("a100-80gb-pcie", "NVIDIA A100 80GB PCIe", 1.935e12, 312e12, 19.5e12, *_AMPERE),
    "a100-40gb": _gpu("a100-40gb", "NVIDIA A100-SXM4-40GB", 1.555e12, 312e12, 19.5e12, *_AMPERE),
    "l40s": _gpu("l40s", "NVIDIA L40S", 0.864e12, 362e12, 91.6e12, *_AMPERE),
    # A GPU without a profile of its own: round mid-range numbers (between an L4 and an A100),
    # so that nothing pretends to be measured; live correction and `sglang-er calibrate` fix them.
    GENERIC_GPU: HardwareProfile(
        name=GENERIC_GPU,
        device="generic GPU (no built-in profile)",
        measured_with="built-in placeholder, not measured: run `sglang-er calibrate` on this GPU",
        bandwidth_bytes_per_s=1.0e12,
        flops_per_s={"bf16": 150e12, "fp16": 150e12, "fp32": 20e12, "w4": 100e12},
        fixed_plain_s=1.5e-3,
        fixed_draft_step_s=0.25e-3,
        fixed_verify_s=1.7e-3,
        per_seq_s=3e-6,
        per_seq_draft_s=1e-6,
        attention_backend="flashinfer",
    ),
}
_ALIASES = {"cpu": "cpu-2core", "h100": "h100-sxm", "a100": "a100-80gb", "generic": GENERIC_GPU}
# (pattern on the normalised torch.cuda.get_device_name, built-in profile), first match wins: the
# variants of one chip differ by up to 1.7x in bandwidth (H100 SXM vs PCIe), so each SKU is named;
# word boundaries keep "GH200" off the H200 and "L40" off the L40S.
_GPU_PROFILES = (
    (r"\bH200\b.*\bNVL\b", "h200-nvl"),
    (r"\bH200\b", "h200"),
    (r"\bH100\b.*\bPCIE\b", "h100-pcie"),
    (r"\bH100\b.*\bNVL\b", "h100-nvl"),
    (r"\bH100\b", "h100-sxm"),
    (r"\bA100\b.*\b40 ?GB\b", "a100-40gb"),
    (r"\bA100\b.*\bPCIE\b", "a100-80gb-pcie"),
    (r"\bA100\b", "a100-80gb"),
    (r"\bL40S\b", "l40s"),
)


def builtin_profile(name: str) -> HardwareProfile:
    """A built-in profile by name (see :data:`BUILTIN_PROFILES`; aliases cpu, h100, a100, generic)."""
    key = _ALIASES.get(name, name)
    if key not in BUILTIN_PROFILES:
        raise ValueError(
            f"unknown built-in hardware profile {name!r}; choose one of {', '.join([*BUILTIN_PROFILES, *_ALIASES])}"
        )
    return BUILTIN_PROFILES[key]


def gpu_profile_name(gpu_name: str) -> str | None:
    """The built-in profile of a GPU named like ``torch.cuda.get_device_name`` ("NVIDIA H100 80GB
    HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA L40S"), or None when it has none."""
    norm = " ".join(re.sub(r"[-_/]", " ", gpu_name.upper()).split())
    return next((key for pat, key in _GPU_PROFILES if re.search(pat, norm)), None)


def builtin_profile_for_device(gpu_name: str | None, *, warn: bool = True) -> HardwareProfile:
    """The built-in profile of a device: ``gpu_name`` is ``torch.cuda.get_device_name`` (None: the
    CPU). A GPU without a built-in profile gets :data:`GENERIC_GPU`, never another GPU's numbers,
    and (``warn``) a warning that names ``sglang-er calibrate``."""
    if gpu_name is None:
        return BUILTIN_PROFILES["cpu-2core"]
    key = gpu_profile_name(gpu_name)
    if key is not None:
        if warn:
            logger.info("hardware profile %r for GPU %r: %s", key, gpu_name, _PUBLIC_SPEC)
        return BUILTIN_PROFILES[key]
    if warn:
        logger.warning(
            "no built-in hardware profile for GPU %r: starting from the uncalibrated %r placeholder "
            "(live correction adjusts it as the server decodes). For good decisions from the first "
            "iterations run `sglang-er calibrate --model-path M --out profile.json` on this GPU and "
            "start the server with %s=profile.json",
            gpu_name,
            GENERIC_GPU,
            PROFILE_ENV,
        )
    return BUILTIN_PROFILES[GENERIC_GPU]


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


# ---------------------------------------------------------------------- the cost formula
Num = float | np.ndarray
# The overheads a phase pays: plain and verify are SGLang forwards, draft is one lean drafter step.
_FIXED_COL = {"plain": "fixed_plain_s", "draft": "fixed_draft_step_s", "verify": "fixed_verify_s"}
_SEQ_COL = {"plain": "per_seq_s", "draft": "per_seq_draft_s", "verify": "per_seq_s"}


def roofline_seconds(
    mem_s: Num,
    compute_s: Num,
    per_seq_s: Num,
    batch: Num,
    fixed_s: Num,
    forwards: Num = 1,
    *,
    maximum: Callable[[Num, Num], Num] = max,
) -> Num:
    """Seconds of ``forwards`` identical forwards of ``batch`` requests: max(bytes/BW, Σ_k flops_k/F_k)
    + forwards·(per_seq·B + fixed), given ``mem_s`` = bytes/BW and ``compute_s`` = Σ_k flops_k/F_k
    over all of them. ``maximum=np.maximum`` evaluates it for arrays (fit_profile: every sample at
    once, for a trial parameter vector that need not be a valid profile)."""
    return maximum(mem_s, compute_s) + per_seq_s * batch * forwards + fixed_s * forwards


def compute_seconds(profile: HardwareProfile, flops: Mapping[str, float]) -> float:
    """Σ_k flops_k / F_k over compute classes (a class the profile lacks runs at its bf16 rate)."""
    return sum(f / profile.flops(k) for k, f in flops.items())


def phase_seconds(
    profile: HardwareProfile, phase: str, bytes_: float, compute_s: float, batch: int, forwards: int = 1
) -> float:
    """:func:`roofline_seconds` with ``profile``'s bandwidth and ``phase``'s overheads;
    ``forwards=0``: the roofline term alone."""
    return roofline_seconds(
        bytes_ / profile.bandwidth_bytes_per_s,
        compute_s,
        getattr(profile, _SEQ_COL[phase]),
        batch,
        getattr(profile, _FIXED_COL[phase]),
        forwards,
    )


# ---------------------------------------------------------------------- fitting
class CalibrationSample(BaseModel):
    """One timed forward (or ``forwards`` identical ones timed together).

    bytes: total bytes moved (weights + KV + logits) over all ``forwards``;
    flops: total flop per compute class (a bare number means ``bf16``);
    batch: requests per forward; seconds: measured wall time of all ``forwards``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    phase: Phase = "plain"
    bytes: float = Field(ge=0.0)
    flops: dict[ComputeClass, float]
    batch: int = Field(ge=1)
    seconds: float = Field(gt=0.0)
    forwards: int = Field(1, ge=1)

    @field_validator("flops", mode="before")
    @classmethod
    def _scalar_flops(cls, v):
        if isinstance(v, (int, float)):
            return {"bf16": float(v)}
        return v

    @field_validator("flops")
    @classmethod
    def _nonneg(cls, v):
        if any(f < 0 for f in v.values()):
            raise ValueError("flops must be non-negative")
        return v


SampleLike = CalibrationSample | dict | Sequence


def _as_sample(s: SampleLike) -> CalibrationSample:
    if isinstance(s, CalibrationSample):
        return s
    if isinstance(s, dict):
        return CalibrationSample.model_validate(s)
    s = tuple(s)
    if len(s) == 4:  # (bytes, flops, batch, seconds): a plain decode forward
        return CalibrationSample(bytes=s[0], flops=s[1], batch=s[2], seconds=s[3])
    if len(s) == 5:  # (phase, bytes, flops, batch, seconds)
        return CalibrationSample(phase=s[0], bytes=s[1], flops=s[2], batch=s[3], seconds=s[4])
    raise ValueError(
        f"a calibration sample is (bytes, flops, batch, seconds) or "
        f"(phase, bytes, flops, batch, seconds), got {len(s)} values"
    )


def _nnls(A: np.ndarray, b: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """Lawson–Hanson non-negative least squares: argmin_x≥0 ‖Ax − b‖₂. A [m, n], b [m]."""
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 1e-12 * max(1.0, float(np.abs(A).max(initial=0.0))) * max(m, n)
    for _ in range(max_iter):
        w = A.T @ (b - A @ x)
        cand = (~passive) & (w > tol)
        if not cand.any():
            break
        passive[np.argmax(np.where(cand, w, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / np.maximum(x[neg] - z[neg], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def sample_seconds(profile: HardwareProfile, s: CalibrationSample) -> float:
    """:func:`fit_profile`'s model of one sample under ``profile``."""
    return phase_seconds(profile, s.phase, s.bytes, compute_seconds(profile, s.flops), s.batch, s.forwards)


def fit_profile(
    samples: Iterable[SampleLike],
    *,
    base: HardwareProfile | None = None,
    name: str = "calibrated",
    device: str | None = None,
    measured_with: str = "fit_profile",
    attention_backend: str | None = None,
) -> HardwareProfile:
    """Fit BW, F (per compute class) and the overheads to measured samples.

    Model per sample i (n_i forwards of batch B_i)::

        seconds_i = max(bytes_i / BW, Σ_k flops_ik / F_k) + n_i·B_i·per_seq(phase) + n_i·fixed(phase)

    Every unknown enters as a non-negative coefficient (1/BW, 1/F_k, overheads), so for a
    fixed memory/compute classification of the samples the fit is linear NNLS. The roofline
    classification is a threshold on arithmetic intensity (flop/byte vs the ridge F/BW), so we
    try every intensity threshold (≤ 64 quantiles), refine each by re-classifying with the
    fitted ridge, and keep the fit with the lowest error of the true max() model. Rows are
    weighted by 1/seconds: relative errors, so a 1 ms forward counts as much as a 1 s one.

    Parameters the samples cannot determine (a compute class never compute-bound, a phase
    never measured) keep ``base``'s value (default: the ``cpu-2core`` built-in); the result's
    ``fitted`` lists those that were determined, ``fit_rel_rms`` the relative RMS error.
    Raises ValueError for fewer than 2 samples or an implausible result.
    """
    ss = [_as_sample(s) for s in samples]
    if len(ss) < 2:
        raise ValueError(f"fit_profile needs at least 2 samples, got {len(ss)}")
    base = base or BUILTIN_PROFILES["cpu-2core"]
    classes = sorted({k for s in ss for k, f in s.flops.items() if f > 0})
    cols = [
        "inv_bw",
        *[f"inv_f:{k}" for k in classes],
        "per_seq_s",
        "per_seq_draft_s",
        "fixed_plain_s",
        "fixed_draft_step_s",
        "fixed_verify_s",
    ]
    ci = {c: i for i, c in enumerate(cols)}
    m, n = len(ss), len(cols)

    t = np.array([s.seconds for s in ss])
    wgt = 1.0 / t
    byt = np.array([s.bytes for s in ss])
    flo = np.zeros((m, len(classes)))
    over = np.zeros((m, n))  # overhead columns, independent of the classification
    for i, s in enumerate(ss):
        for j, k in enumerate(classes):
            flo[i, j] = s.flops.get(k, 0.0)
        over[i, ci[_SEQ_COL[s.phase]]] = s.forwards * s.batch
        over[i, ci[_FIXED_COL[s.phase]]] = s.forwards
    seq_col = np.array([ci[_SEQ_COL[s.phase]] for s in ss])
    fixed_col = np.array([ci[_FIXED_COL[s.phase]] for s in ss])
    batch = np.array([float(s.batch) for s in ss])
    fwd = np.array([float(s.forwards) for s in ss])
    intensity = flo.sum(1) / np.maximum(byt, 1e-30)

    def solve(mem: np.ndarray) -> np.ndarray:
        A = over.copy()
        A[:, 0] = np.where(mem, byt, 0.0)
        A[:, 1 : 1 + len(classes)] = np.where(mem[:, None], 0.0, flo)
        A *= wgt[:, None]
        scale = np.linalg.norm(A, axis=0)
        scale[scale == 0] = 1.0  # an empty column stays 0: unidentified
        return _nnls(A / scale, t * wgt) / scale

    def predict(x: np.ndarray) -> np.ndarray:
        return roofline_seconds(
            byt * x[0], flo @ x[1 : 1 + len(classes)], x[seq_col], batch, x[fixed_col], fwd, maximum=np.maximum
        )

    def classify(x: np.ndarray) -> np.ndarray:
        return byt * x[0] >= flo @ x[1 : 1 + len(classes)]

    thresholds = np.unique(intensity)
    if len(thresholds) > 64:
        thresholds = np.quantile(intensity, np.linspace(0, 1, 64))
    best_x, best_err = None, math.inf
    for thr in [-math.inf, *thresholds.tolist()]:
        mem = intensity <= thr  # at or below the threshold: memory-bound (-inf: all compute-bound)
        for _ in range(20):
            x = solve(mem)
            new = classify(x)
            if (new == mem).all():
                break
            mem = new
        err = float(np.sqrt(np.mean(((predict(x) - t) / t) ** 2)))
        if err < best_err - 1e-15:
            best_x, best_err = x, err
    x = best_x
    used = np.zeros(n, dtype=bool)
    mem = classify(x)
    used[0] = bool((mem & (byt > 0)).any())
    for j in range(len(classes)):
        used[1 + j] = bool(((~mem) & (flo[:, j] > 0)).any())
    used[1 + len(classes) :] = (over != 0).any(0)[1 + len(classes) :]

    fitted: list[str] = []
    fields = base.model_dump()
    if used[0] and x[0] > 0:
        fields["bandwidth_bytes_per_s"] = 1.0 / x[0]
        fitted.append("bandwidth_bytes_per_s")
    flops = dict(base.flops_per_s)
    for j, k in enumerate(classes):
        if used[1 + j] and x[1 + j] > 0:
            flops[k] = float(1.0 / x[1 + j])
            fitted.append(f"flops_per_s.{k}")
    fields["flops_per_s"] = flops
    for c in cols[1 + len(classes) :]:
        if used[ci[c]]:
            fields[c] = float(x[ci[c]])
            fitted.append(c)
    fields.update(
        name=name, device=device or base.device, measured_with=measured_with, fit_rel_rms=best_err, fitted=fitted
    )
    if attention_backend is not None:
        fields["attention_backend"] = attention_backend
    return fitted_profile(fields, "fit_profile")


def fitted_profile(fields: dict, fit: str) -> HardwareProfile:
    """A fit's parameters as a checked profile; out-of-range ones mean the samples do not follow the
    roofline form, which is what the error says."""
    try:
        return HardwareProfile.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(
            f"{fit} produced an implausible profile ({problems}); the samples do not follow the roofline form"
        ) from None
