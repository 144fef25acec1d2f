"""4-bit weight quantization for the W4 drafter: round-to-nearest (RTN), asymmetric, grouped.

Each output row of a weight ``W [N, K]`` is cut into groups of ``group_size`` consecutive
input channels; every group gets its own scale and integer zero point::

    s = max(max_g - min_g, 1e-5) / 15
    z = clamp(round(-min_g / s), 0, 15)
    q = clamp(round(w / s) + z, 0, 15)
    w' = (q - z) * s

The result is a :class:`QuantizedTensor`, the one currency between quantizers and kernels:
a later AWQ quantizer only has to produce the same object (it folds its per-input-channel
scale into ``W`` before quantizing; :class:`sglang_er.quant.w4linear.W4Linear` divides the
activations by it). :func:`pack_awq` converts it to the AutoAWQ checkpoint layout that SGLang's
AWQ / AWQ-Marlin code consumes.

Group-size rule (:func:`choose_group_size`): the group must divide ``K`` and be accepted by
both 4-bit kernels we dispatch to,

* CPU ``torch.ops.aten._weight_int4pack_mm_for_cpu``: group in {32, 64, 128, 256};
* CUDA Marlin (``gptq_marlin_gemm`` with AWQ zero points): group in {-1, 32, 64, 128},

so the candidates are 128, 64, 32 (largest first: fewer scales, same kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_er.limits import SUPPORTED_GROUP_SIZES, largest_group_size

__all__ = [
    "SUPPORTED_GROUP_SIZES",
    "QuantizedTensor",
    "choose_group_size",
    "quantize_rtn",
    "pack_awq",
    "AWQ_PACK_ORDER",
]

QMAX = 15
# AutoAWQ stores output column ``8*c + AWQ_PACK_ORDER[p]`` in nibble ``p`` of int32 ``c``
# (SGLang undoes it with the reverse order [0, 4, 1, 5, 2, 6, 3, 7]).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Rows are processed in blocks of about this many elements. On a CPU, small enough that the
# several elementwise passes of a block stay in cache (re-quantizing Qwen2-0.5B after every policy
# update is memory-bound there: 3x faster than 64 MB blocks). On a GPU each pass of a block is one
# kernel launch, so cache-sized blocks would cost ~25k launches per 7B update (5 s on an H200):
# there a block is 64M elements, a few float32 temporaries of 256 MB. Both bound the peak memory
# for an lm_head (151936 x 896).
_BLOCK_ELEMS_CPU = 1 << 18
_BLOCK_ELEMS_GPU = 1 << 26


def _block_rows(w: torch.Tensor) -> int:
    return max(1, (_BLOCK_ELEMS_CPU if w.device.type == "cpu" else _BLOCK_ELEMS_GPU) // w.shape[1])


def choose_group_size(in_features: int, preferred: int = 128) -> int:
    """Largest group size in (128, 64, 32), not above ``preferred``, that divides ``in_features``.

    Examples: K=576 -> 64, K=896 -> 128, K=1536 -> 128, K=4864 -> 128, K=128/384 -> 128.
    Raises ValueError when ``preferred`` is not a supported size or no candidate divides K.
    """
    if preferred not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group size {preferred} is not supported; choose one of {SUPPORTED_GROUP_SIZES} "
            "(accepted by both the CPU int4pack kernel and CUDA Marlin)"
        )
    g = largest_group_size(in_features, preferred)
    if g is not None:
        return g
    raise ValueError(
        f"no 4-bit group size <= {preferred} from {SUPPORTED_GROUP_SIZES} divides "
        f"in_features={in_features}; a linear layer with K={in_features} cannot be W4-quantized"
    )


@dataclass
class QuantizedTensor:
    """A grouped 4-bit weight.

    q:      uint8 [N, K], values 0..15
    scales: float32 [N, K // group_size]
    zeros:  uint8 [N, K // group_size], integer zero points 0..15
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - z) * s`` computed in float32, returned as ``dtype`` [N, K]."""
        n, k = self.q.shape
        g = self.group_size
        q = self.q.view(n, k // g, g).to(torch.float32)
        z = self.zeros.to(torch.float32).unsqueeze(-1)
        w = (q - z) * self.scales.to(torch.float32).unsqueeze(-1)
        return w.reshape(n, k).to(dtype)

    def to(self, device) -> QuantizedTensor:
        return QuantizedTensor(self.q.to(device), self.scales.to(device), self.zeros.to(device), self.group_size)


def _check_shape(w: torch.Tensor, group_size: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if group_size <= 0 or w.shape[1] % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={w.shape[1]} (weight shape {tuple(w.shape)})"
        )


def _quantize_block(w: torch.Tensor, group_size: int, col_scale: torch.Tensor | None = None):
    n, k = w.shape
    wf = w.to(torch.float32) if col_scale is None else w.float() * col_scale
    wg = wf.reshape(n, k // group_size, group_size)
    mn, mx = torch.aminmax(wg, dim=-1)
    s = (mx - mn).clamp_min(1e-5) / QMAX
    z = torch.round(-mn / s).clamp_(0, QMAX)
    q = wg.div(s.unsqueeze(-1)).round_().add_(z.unsqueeze(-1)).clamp_(0, QMAX)
    return q.to(torch.uint8).reshape(n, k), s, z.to(torch.uint8)


def quantize_rtn(w: torch.Tensor, group_size: int, col_scale: torch.Tensor | None = None) -> QuantizedTensor:
    """Round-to-nearest asymmetric 4-bit quantization of ``w [N, K]`` (any float dtype), or of
    ``w · diag(col_scale)`` (AWQ; scaled block by block, so no float32 copy of ``w`` is made).

    Vectorised over all groups; rows are only split into cache-sized blocks.
    Tensors are created on ``w.device``.
    """
    _check_shape(w, group_size)
    n, k = w.shape
    if col_scale is not None:
        col_scale = col_scale.to(w.device, torch.float32)
    rows = _block_rows(w)
    if n <= rows:
        q, s, z = _quantize_block(w, group_size, col_scale)
        return QuantizedTensor(q, s, z, group_size)
    q = torch.empty((n, k), dtype=torch.uint8, device=w.device)
    s = torch.empty((n, k // group_size), dtype=torch.float32, device=w.device)
    z = torch.empty((n, k // group_size), dtype=torch.uint8, device=w.device)
    for r in range(0, n, rows):
        q[r : r + rows], s[r : r + rows], z[r : r + rows] = _quantize_block(w[r : r + rows], group_size, col_scale)
    return QuantizedTensor(q, s, z, group_size)


def _pack_nibbles_awq(v: torch.Tensor) -> torch.Tensor:
    """uint8 [R, C] (values 0..15, C % 8 == 0) -> int32 [R, C // 8] in AutoAWQ nibble order."""
    r, c = v.shape
    if c % 8 != 0:
        raise ValueError(f"AWQ packing needs a column count divisible by 8, got {c}")
    v = v.to(torch.int64).view(r, c // 8, 8)[:, :, list(AWQ_PACK_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=v.device)
    packed = (v << shifts).sum(dim=-1)
    # Nibble 7 reaches bit 31: wrap into the int32 range the way a C int32 would hold it.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def pack_awq(qt: QuantizedTensor, scale_dtype: torch.dtype = torch.float16):
    """AutoAWQ checkpoint tensors for ``qt`` (weight [N, K], group g).

    Returns ``(qweight int32 [K, N // 8], qzeros int32 [K // g, N // 8], scales [K // g, N])``,
    ``scales`` in ``scale_dtype`` (fp16 in AutoAWQ checkpoints; Marlin wants the activation dtype).
    """
    qweight = _pack_nibbles_awq(qt.q.t().contiguous())
    qzeros = _pack_nibbles_awq(qt.zeros.t().contiguous())
    scales = qt.scales.t().contiguous().to(scale_dtype)
    return qweight, qzeros, scales
