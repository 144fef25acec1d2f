"""torch's own 4-bit weight-only kernels ("tinygemm", the int4 path of gpt-fast): CPU and CUDA layouts.

They need nothing beyond torch, so a W4 drafter runs at 4-bit speed on a CUDA machine even where
SGLang's Marlin kernels do not import. Both devices compute, per group of ``group_size`` input
channels, ``w = (q - 8) * scale + zero`` with a *float* zero; our integer zero point ``z`` becomes
``zero = (8 - z) * scale`` (:func:`scale_zeros`), the same tensor layout on both devices.

CPU: ``_convert_weight_to_int4pack_for_cpu`` (int32 [N, K] in, uint8 [N, K/2] out) and
``_weight_int4pack_mm_for_cpu``; N % 16 == 0, group in {32, 64, 128, 256}, K % group == 0;
activations bf16 / fp16 / fp32.

CUDA (sm80+, NVIDIA builds; read from ``aten/src/ATen/native/cuda/int4mm.cu``): the weight goes in as
uint8 [N, K/2] with the *even* column in the high nibble, and comes out int32
[N/8, K/(16·t), 32, t/2] for t = innerKTiles in {2, 4, 8} (K % (16·t) == 0; the largest is the
widest load). ``_weight_int4pack_mm`` takes a contiguous 2-D **bf16** activation only, group in
{32, 64, 128, 256}, and returns [M, ceil(N/8)·8]: N % 8 == 0 keeps the output unpadded.
"""

from __future__ import annotations

import torch

from sglang_er.quant.quantizer import QuantizedTensor

__all__ = [
    "cpu_supports",
    "cuda_supports",
    "cuda_inner_k_tiles",
    "cuda_device_ok",
    "pack_cpu",
    "cuda_nibbles",
    "pack_cuda",
    "scale_zeros",
]

_GROUPS = (32, 64, 128, 256)  # both devices


def cpu_supports(n: int, k: int, group_size: int) -> bool:
    """Shape rule of ``_weight_int4pack_mm_for_cpu`` (found empirically on torch 2.14)."""
    return n % 16 == 0 and group_size in _GROUPS and k % group_size == 0


def cuda_inner_k_tiles(k: int) -> int | None:
    """The widest innerKTiles (8, 4, 2) whose K-super-tile (16·t columns) divides K; None if none."""
    for t in (8, 4, 2):
        if k % (16 * t) == 0:
            return t
    return None


def cuda_supports(n: int, k: int, group_size: int) -> bool:
    """Shape rule of ``_weight_int4pack_mm`` on CUDA (the checks in int4mm.cu)."""
    return n % 8 == 0 and group_size in _GROUPS and k % group_size == 0 and cuda_inner_k_tiles(k) is not None


def cuda_device_ok() -> bool:
    """An NVIDIA GPU of compute capability 8.0+ (the kernel's mma tiles; the ROCm build uses another
    tile size, not handled here)."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def pack_cpu(q: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """uint8 [N, K] (0..15) -> the CPU layout uint8 [N, K/2], converted in row blocks (the op is
    row-wise) so no int32 copy of the whole weight is made on every re-quantization."""
    n, k = q.shape
    out = torch.empty((n, k // 2), dtype=torch.uint8, device=q.device)
    for r in range(0, n, rows):
        out[r : r + rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[r : r + rows].to(torch.int32), 1)
    return out


def cuda_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] (0..15) -> uint8 [N, K/2], even column in the high nibble (the CUDA op's input)."""
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def pack_cuda(q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - CUDA only
    """uint8 [N, K] (0..15) on a CUDA device -> int32 [N/8, K/(16·t), 32, t/2]."""
    t = cuda_inner_k_tiles(q.shape[1])
    if t is None:
        raise ValueError(f"K={q.shape[1]} is not a multiple of 32")
    return torch.ops.aten._convert_weight_to_int4pack(cuda_nibbles(q), t)


def scale_zeros(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """[K/g, N, 2] in ``dtype``: (scale, float zero) per group, as both devices' kernels read them.

    The zero is derived from the *rounded* scale, so ``(q-8)*s + (8-z)*s`` stays ``(q-z)*s`` up to
    one rounding of the zero term (a float32 model gets the same values only up to that rounding,
    which is why the CPU kernel is not chosen for float32 by default).
    """
    s = qt.scales.to(dtype)
    zero = (8.0 - qt.zeros.to(torch.float32)) * s.to(torch.float32)
    sz = torch.stack((s, zero.to(dtype)), dim=-1)  # [N, K/g, 2]
    return sz.transpose(0, 1).contiguous()
