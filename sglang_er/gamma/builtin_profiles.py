"""Built-in hardware profiles, and which one a device starts on.

Datasheet numbers (peak memory bandwidth, dense bf16 TFLOP/s) for the A100, H100, H200 and L40S
variants, matched on ``torch.cuda.get_device_name`` per SKU and labelled as such, and a measured
default for a 2-core CPU. :func:`builtin_profile_for_device` picks the profile of a device: any
other GPU gets the labelled ``generic-gpu`` placeholder and a warning to run ``sglang-er
calibrate``, never another GPU's numbers. Live correction
(:class:`sglang_er.gamma.correction.Correction`) adjusts whichever profile the server starts on.
"""

from __future__ import annotations

import logging
import re

from sglang_er.gamma.hardware_profile import PROFILE_ENV, HardwareProfile

__all__ = ["BUILTIN_PROFILES", "GENERIC_GPU", "builtin_profile", "builtin_profile_for_device", "gpu_profile_name"]

logger = logging.getLogger(__name__)

GENERIC_GPU = "generic-gpu"  # the built-in placeholder of a GPU that has no profile of its own

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
