"""The AWQ scale search for one group of linears that share an input, and where its scales go.

With ``s = mean|x| ** β`` per input channel, the W4 layer computes
``(x / s) Q(W · diag(s))ᵀ``; :func:`search_scales` scores a grid of β by that layer's output error
on a sample of real inputs and keeps the best. ``β = 0`` (``s = 1``, plain RTN) is always scored,
so the choice never loses to RTN on the sample. :func:`fold_into_norm` and :func:`scale_weight`
apply a chosen ``s`` where the group's input is an RMSNorm output (see :mod:`sglang_er.quant.awq`).
Nothing here keeps state or imports SGLang.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from sglang_er.quant.quantizer import QMAX, choose_group_size

__all__ = [
    "DEFAULT_BETAS",
    "awq_scales",
    "search_scales",
    "output_errors",
    "fake_quant_f32",
    "fold_into_norm",
    "scale_weight",
]

DEFAULT_BETAS = tuple(i / 10 for i in range(11))  # linspace(0, 1, 11)
_MEAN_FLOOR = 1e-6  # floor of mean|x| before the power (dead channels)
_SCALE_FLOOR = 1e-4  # floor of s after normalisation (AutoAWQ's clamp)
_BLOCK_ELEMS = 1 << 24  # fake_quant_f32 works on row blocks of about this many elements

WeightGroup = torch.Tensor | Sequence[torch.Tensor]


def row_subset(weights: WeightGroup, max_rows: int) -> list[torch.Tensor]:
    """About ``max_rows`` evenly spaced rows of the group, spread over its members by size."""
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    total = sum(w.shape[0] for w in ws)
    if total <= max_rows:
        return ws
    step = -(-total // max_rows)
    return [w[::step] for w in ws]


def as_weight(weights: WeightGroup) -> torch.Tensor:
    """One float32 [ΣN_i, K] matrix: members of a group share the input and s, and RTN groups are
    per row, so quantizing the concatenation equals quantizing each member."""
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not ws:
        raise ValueError("empty weight group")
    k = ws[0].shape[-1]
    for w in ws:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weights of a group must be 2-D with the same K={k}, got {tuple(w.shape)}")
    w = ws[0] if len(ws) == 1 else torch.cat([w.to(ws[0].device) for w in ws], dim=0)
    return w.detach().to(torch.float32)


def fake_quant_f32(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 [N, K] bit-identical to ``quantize_rtn(w, group_size).dequantize()`` (``w`` float32).

    Same operations in the same order, but kept in float32 throughout (no uint8 round trip, no
    separate dequantize pass): about 3x faster, which matters because the search quantizes
    every weight once per β. ``tests/test_awq.py`` checks the bit-identity.
    """
    n, k = w.shape
    rows = max(1, _BLOCK_ELEMS // k)
    if n > rows:
        return torch.cat([fake_quant_f32(w[r : r + rows], group_size) for r in range(0, n, rows)])
    wg = w.reshape(n, k // group_size, group_size)
    mn = wg.amin(dim=-1, keepdim=True)
    mx = wg.amax(dim=-1, keepdim=True)
    sc = (mx - mn).clamp_min(1e-5) / QMAX
    z = torch.round(-mn / sc).clamp_(0, QMAX)
    q = torch.round(wg / sc).add_(z).clamp_(0, QMAX)
    return q.sub_(z).mul_(sc).reshape(n, k)


def awq_scales(x_mean_abs: torch.Tensor, beta: float) -> torch.Tensor:
    """``s = mean|x| ** β`` normalised by ``sqrt(max(s) · min(s))`` (AutoAWQ), floored at 1e-4.

    ``β = 0`` gives exactly ones. float32 [K] on ``x_mean_abs``'s device.
    """
    m = x_mean_abs.detach().to(torch.float32)
    if beta == 0:
        return torch.ones_like(m)
    s = m.clamp_min(_MEAN_FLOOR).pow(beta)
    s = s / (s.amax() * s.amin()).sqrt()
    return s.clamp_min(_SCALE_FLOOR)


def scale_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W · diag(s)`` in float32 -- the weight to quantize when ``1/s`` is folded into a norm.

    Being float32, pass the model's ``act_dtype`` to ``W4Linear.from_float`` (it would otherwise
    take float32 from the weight); ``requantize_`` of an existing layer needs nothing extra.
    """
    return weight.detach().to(torch.float32) * s.to(weight.device, torch.float32)[None, :]


@torch.no_grad()
def output_errors(
    weights: WeightGroup,
    x_sample: torch.Tensor,
    scales: Sequence[torch.Tensor],
    group_size: int,
) -> torch.Tensor:
    """``Σ_i ||x W_iᵀ − (x/s) Q(W_i · diag(s))ᵀ||²`` on ``x_sample [R, K]`` for each ``s`` in
    ``scales``; float32 [len(scales)] on the weights' device (no host sync).

    Computed as ``||x · (W − Q(W·diag(s)) / s)ᵀ||²``: one RTN pass and one matmul per candidate.
    """
    w = as_weight(weights)
    x = x_sample.detach().to(w.device, torch.float32)
    errs = []
    for s in scales:
        s = s.to(w.device, torch.float32)
        wq = fake_quant_f32(w * s[None, :], group_size).div_(s[None, :])
        d = w - wq
        errs.append((x @ d.t()).pow(2).sum())
    return torch.stack(errs)


@torch.no_grad()
def search_scales(
    weights: WeightGroup,
    x_mean_abs: torch.Tensor,
    x_sample: torch.Tensor,
    group_size: int | None = None,
    betas: Iterable[float] | None = None,
    *,
    return_all: bool = False,
):
    """AWQ scale search for a group of linears sharing one input (qkv; gate_up; o; down).

    weights:     ``W_i [N_i, K]`` (a list, or one already-fused tensor), any dtype/device.
    x_mean_abs:  ``[K]`` running mean of ``|x|`` (:meth:`~sglang_er.quant.awq.ActivationStats.mean_abs`).
    x_sample:    ``[R, K]`` input rows (:meth:`~sglang_er.quant.awq.ActivationStats.sample`) for the objective.
    group_size:  quantization group (default :func:`choose_group_size` (K)).
    betas:       grid of exponents (default ``linspace(0, 1, 11)``); 0 (RTN) is always added.

    For each β: ``s = awq_scales(x_mean_abs, β)`` and the output error
    ``Σ_i ||x W_iᵀ − (x/s) Q(W_i · diag(s))ᵀ||²`` on the sample. Returns ``(s [K] float32, β,
    err)`` for the minimum (ties go to the smaller β, so RTN wins ties); with
    ``return_all=True`` ``(s, β, err, betas list, errs [n_betas] float32 CPU)``. Vectorised over
    rows, groups and channels; the only Python loop is over β. One host sync (the argmin).
    """
    w = as_weight(weights)
    k = w.shape[1]
    if x_mean_abs.shape != (k,):
        raise ValueError(f"x_mean_abs must have shape ({k},), got {tuple(x_mean_abs.shape)}")
    if x_sample.dim() != 2 or x_sample.shape[1] != k:
        raise ValueError(f"x_sample must have shape [R, {k}], got {tuple(x_sample.shape)}")
    g = choose_group_size(k) if group_size is None else int(group_size)
    grid = sorted({0.0, *(float(b) for b in (DEFAULT_BETAS if betas is None else betas))})
    m = x_mean_abs.to(w.device, torch.float32)
    scales = [awq_scales(m, b) for b in grid]
    errs = output_errors(w, x_sample, scales, g)
    errs_cpu = errs.cpu()  # the one sync
    best = int(torch.argmin(errs_cpu))  # first minimum: ties -> smaller β
    out = (scales[best], grid[best], float(errs_cpu[best]))
    if return_all:
        return (*out, grid, errs_cpu)
    return out


def fold_into_norm(norm_weight: torch.Tensor, s: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``norm_weight / s`` (computed in float32, returned in ``dtype``, default the norm's dtype).

    Use for qkv (after ``input_layernorm``) and gate_up (after ``post_attention_layernorm``):
    the drafter's *own copy* of the norm weight becomes ``norm / s`` and the layer quantizes
    ``W · diag(s)`` (:func:`scale_weight`) without an input_scale. o and down have no norm in
    front; they keep the division inside :class:`~sglang_er.quant.w4linear.W4Linear` (``input_scale=s``).
    Returns a new tensor; the argument (the target's norm) is never modified.
    """
    out = norm_weight.detach().to(torch.float32) / s.to(norm_weight.device, torch.float32)
    return out.to(norm_weight.dtype if dtype is None else dtype)
