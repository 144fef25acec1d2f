"""Activation-aware weight quantization (AWQ) for the self-drafter, engine-free.

The drafter is a W4 copy of the policy, re-quantized after every weight update. Plain RTN
(:func:`sglang_er.quant.quantizer.quantize_rtn`) treats every input channel alike; LLM activations
have a few channels that are one to two orders of magnitude larger than the rest, and the
rounding error of the weights that multiply them dominates the output error. AWQ (Lin et al.,
2023) scales those weight columns up before quantizing (``W · diag(s)``, so they get relatively
finer steps) and divides the activations by the same ``s``::

    y = x Wᵀ = (x / s) (W · diag(s))ᵀ  ≈  (x / s) Q(W · diag(s))ᵀ

with ``s = mean|x| ** β`` per input channel and ``β`` chosen per linear group from a grid by
the output error on a sample of real inputs. ``β = 0`` is ``s = 1``, i.e. RTN, and is always a
candidate, so the chosen scaling is never worse than RTN on that sample.

Pieces (none imports SGLang):

:class:`ActivationStats`
    running mean of ``|x|`` per input channel of one linear group plus a small ring buffer
    ("reservoir") of recent input rows. Updates are device-side (no host sync), bounded
    (at most ``max_tokens`` random rows per call; callers sample every ``sample_every``-th
    iteration via :meth:`ActivationStats.should_sample`) and slowly decaying, so the statistics
    follow the rollout data distribution. They describe *data*, not weights: they are kept
    across weight updates, and every re-quantization re-runs the (cheap) β search with the new
    weights against the same statistics.
:func:`search_scales`
    the β grid search for one group of linears that share an input.
:func:`fold_into_norm`
    ``norm_weight / s``: where the group's input is an RMSNorm output, ``1/s`` folds into the
    norm weight and the W4 layer needs no division at run time.
:class:`AWQQuantizer`
    one :class:`ActivationStats` per (layer, linear group); :meth:`AWQQuantizer.search` returns
    an :class:`AWQChoice` (``s``, ``β``, errors) per linear, falling back to RTN (``s = 1``)
    while fewer than ``min_tokens`` tokens have been observed (cold start).

Where ``s`` goes, per linear group of a Llama-family decoder layer (:data:`FOLD_TARGET`):

=======  ==================================  ================================================
group    input                               how ``1/s`` is applied
=======  ==================================  ================================================
qkv      ``input_layernorm(h)``              folded: drafter's norm copy = ``input_norm / s``;
                                             quantize ``W_qkv · diag(s)``, no input_scale
gate_up  ``post_attention_layernorm(h)``     folded: drafter's norm copy = ``post_norm / s``;
                                             quantize ``W_gate_up · diag(s)``, no input_scale
o        attention output                    ``W4Linear(..., input_scale=s)`` divides ``x / s``
down     ``silu(gate) * up``                 ``W4Linear(..., input_scale=s)`` divides ``x / s``
=======  ==================================  ================================================

Folding writes a *drafter-owned copy* of the norm weight (the target's norm must never be
touched; the drafter shares norms by reference today, so a folded layer needs its own copy),
recomputed from the target's current norm after every weight update (RL updates change norms
too). AutoAWQ folds o's ``1/s`` into v_proj's output rows (only when ``H == KVH``, i.e. not for
GQA) and down's into up_proj's output rows; here both stay as the W4Linear's run-time division,
which costs one elementwise op and keeps the fused qkv / gate_up weights untouched.

Statistics must be collected on the *target's* input to each linear (the un-scaled ``x``):
e.g. from the verify / prefill pass, outside CUDA-graph capture.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from sglang_er.quant.quantizer import QMAX, choose_group_size

__all__ = [
    "LINEAR_GROUPS",
    "FOLD_TARGET",
    "ActivationStats",
    "AWQChoice",
    "AWQQuantizer",
    "awq_scales",
    "search_scales",
    "output_errors",
    "fake_quant_f32",
    "fold_into_norm",
    "scale_weight",
    "hf_llama_layer_weights",
    "register_hf_llama_hooks",
]

#: The four linear groups of a decoder layer, in drafter order; members of a group share an input.
LINEAR_GROUPS = ("qkv", "o", "gate_up", "down")
#: Group -> the RMSNorm whose weight absorbs ``1/s`` (None: W4Linear divides via input_scale).
FOLD_TARGET = {"qkv": "input_layernorm", "gate_up": "post_attention_layernorm", "o": None, "down": None}

DEFAULT_BETAS = tuple(i / 10 for i in range(11))  # linspace(0, 1, 11)
_MEAN_FLOOR = 1e-6  # floor of mean|x| before the power (dead channels)
_SCALE_FLOOR = 1e-4  # floor of s after normalisation (AutoAWQ's clamp)
_BLOCK_ELEMS = 1 << 24  # fake_quant_f32 works on row blocks of about this many elements


# ============================================================================ statistics
class ActivationStats:
    """Running per-channel mean of ``|x|`` and a ring buffer of recent rows for one linear input.

    ``update(x)`` with ``x [..., K]``:

    * at most ``max_tokens`` rows enter the statistics (a uniformly random subset when more are
      given; the random permutation is drawn on ``x``'s device);
    * ``sum_abs = decay * sum_abs + Σ|x_t|``, ``weight = decay * weight + T'``; the running mean
      is ``sum_abs / weight``. ``decay`` acts once per ``update`` call, so the horizon is about
      ``1 / (1 - decay)`` sampled updates; ``decay = 1`` gives the exact mean of every row used;
    * up to ``reservoir_per_update`` of those rows (more while the reservoir is not yet full)
      overwrite the oldest rows of the reservoir ``[reservoir_size, K]``, so it spans several
      recent batches rather than the last one.

    All tensor state lives on ``device`` and is updated in place with device ops only (no
    ``.item()``, no host sync); the counters that depend only on shapes are Python ints. Call
    it outside CUDA-graph capture. Buffers are always created as normal (non-inference)
    tensors, so the object can be built and updated both inside and outside
    ``torch.inference_mode``.
    """

    def __init__(
        self,
        num_channels: int,
        device: str | torch.device | None = None,
        decay: float = 0.99,
        *,
        sample_every: int = 1,
        max_tokens: int = 256,
        reservoir_size: int = 128,
        reservoir_per_update: int | None = None,
        reservoir_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if sample_every < 1 or max_tokens < 1 or reservoir_size < 1:
            raise ValueError("sample_every, max_tokens and reservoir_size must be >= 1")
        self.num_channels = int(num_channels)
        self.device = torch.device(device if device is not None else "cpu")
        self.decay = float(decay)
        self.sample_every = int(sample_every)
        self.max_tokens = int(max_tokens)
        self.reservoir_size = int(reservoir_size)
        self.reservoir_per_update = int(
            reservoir_per_update if reservoir_per_update is not None else max(1, reservoir_size // 8)
        )
        self.seed = int(seed)
        k = self.num_channels
        with torch.inference_mode(False):  # normal tensors even when built under inference_mode
            self.sum_abs = torch.zeros(k, dtype=torch.float32, device=self.device)
            self.weight = torch.zeros((), dtype=torch.float32, device=self.device)
            self.reservoir = torch.zeros(self.reservoir_size, k, dtype=reservoir_dtype, device=self.device)
        self.reservoir_filled = 0  # valid rows in the reservoir
        self.reservoir_ptr = 0  # next row to overwrite
        self.tokens_seen = 0  # rows offered to update()
        self.tokens_used = 0  # rows that entered the statistics (<= max_tokens per update)
        self.num_updates = 0
        self._gen: torch.Generator | None = None

    # ------------------------------------------------------------------ sampling policy
    def should_sample(self, iteration: int) -> bool:
        """True on every ``sample_every``-th iteration (0, N, 2N, ...)."""
        return iteration % self.sample_every == 0

    def _generator(self) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator(device=self.device)
            self._gen.manual_seed(self.seed)
        return self._gen

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Feed input rows ``x [..., K]`` (any float dtype; moved to ``device`` if needed)."""
        k = self.num_channels
        if x.shape[-1] != k:
            raise ValueError(f"expected inputs with {k} channels, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, k)
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        t = x.shape[0]
        if t == 0:
            return
        n_res = min(self.reservoir_size, max(self.reservoir_per_update, self.reservoir_size - self.reservoir_filled))
        if t > 1 and (t > self.max_tokens or t > n_res):
            # One permutation serves both: the stats subset and the reservoir rows are random.
            perm = torch.randperm(t, device=self.device, generator=self._generator())
            rows = x.index_select(0, perm[: min(t, self.max_tokens)])
        else:
            rows = x
        used = rows.shape[0]
        rf = rows.to(torch.float32)
        if self.decay != 1.0:
            self.sum_abs.mul_(self.decay)
            self.weight.mul_(self.decay)
        self.sum_abs.add_(rf.abs().sum(dim=0))
        self.weight.add_(float(used))
        # reservoir (ring buffer)
        n_res = min(n_res, used)
        r = self.reservoir_size
        end = self.reservoir_ptr + n_res
        src = rows[:n_res].to(self.reservoir.dtype)
        if end <= r:
            self.reservoir[self.reservoir_ptr : end].copy_(src)
        else:
            first = r - self.reservoir_ptr
            self.reservoir[self.reservoir_ptr :].copy_(src[:first])
            self.reservoir[: end - r].copy_(src[first:])
        self.reservoir_ptr = end % r
        self.reservoir_filled = min(r, self.reservoir_filled + n_res)
        self.tokens_seen += t
        self.tokens_used += used
        self.num_updates += 1

    def maybe_update(self, x: torch.Tensor, iteration: int) -> bool:
        """``update(x)`` if :meth:`should_sample` (iteration); returns whether it did."""
        if not self.should_sample(iteration):
            return False
        self.update(x)
        return True

    # ------------------------------------------------------------------ read-out
    def mean_abs(self) -> torch.Tensor:
        """Running mean of ``|x|`` per channel, float32 [K] on ``device`` (zeros before any update)."""
        return self.sum_abs / self.weight.clamp_min(1e-30)

    def sample(self) -> torch.Tensor:
        """The reservoir's valid rows ``[R', K]`` (R' = ``reservoir_filled``), oldest first not guaranteed."""
        return self.reservoir[: self.reservoir_filled]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {
            "num_channels": self.num_channels,
            "decay": self.decay,
            "sample_every": self.sample_every,
            "max_tokens": self.max_tokens,
            "reservoir_size": self.reservoir_size,
            "reservoir_per_update": self.reservoir_per_update,
            "seed": self.seed,
            "sum_abs": self.sum_abs.clone(),
            "weight": self.weight.clone(),
            "reservoir": self.reservoir.clone(),
            "reservoir_filled": self.reservoir_filled,
            "reservoir_ptr": self.reservoir_ptr,
            "tokens_seen": self.tokens_seen,
            "tokens_used": self.tokens_used,
            "num_updates": self.num_updates,
            # the subset sampler's state, so a restored object continues the same random stream
            "rng_state": None if self._gen is None else self._gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore in place (tensors are copied onto this object's device and dtype; the reservoir is
        re-allocated if the saved one has another size)."""
        if int(state["num_channels"]) != self.num_channels:
            raise ValueError(f"state has {state['num_channels']} channels, this has {self.num_channels}")
        if int(state["reservoir_size"]) != self.reservoir_size:  # take the saved size
            self.reservoir_size = int(state["reservoir_size"])
            with torch.inference_mode(False):
                self.reservoir = torch.zeros(
                    self.reservoir_size, self.num_channels, dtype=self.reservoir.dtype, device=self.device
                )
        for key in ("decay", "sample_every", "max_tokens", "reservoir_per_update", "seed"):
            setattr(self, key, type(getattr(self, key))(state[key]))
        with torch.no_grad():
            self.sum_abs.copy_(state["sum_abs"])
            self.weight.copy_(state["weight"])
            self.reservoir.copy_(state["reservoir"])
        for key in ("reservoir_filled", "reservoir_ptr", "tokens_seen", "tokens_used", "num_updates"):
            setattr(self, key, int(state[key]))
        self._gen = None
        if state.get("rng_state") is not None:
            self._generator().set_state(state["rng_state"])

    @classmethod
    def from_state_dict(cls, state: dict, device=None, reservoir_dtype: torch.dtype | None = None) -> ActivationStats:
        obj = cls(
            state["num_channels"],
            device,
            state["decay"],
            sample_every=state["sample_every"],
            max_tokens=state["max_tokens"],
            reservoir_size=state["reservoir_size"],
            reservoir_per_update=state["reservoir_per_update"],
            reservoir_dtype=reservoir_dtype or state["reservoir"].dtype,
            seed=state["seed"],
        )
        obj.load_state_dict(state)
        return obj

    def __repr__(self) -> str:
        return (
            f"ActivationStats(K={self.num_channels}, decay={self.decay}, tokens_used={self.tokens_used}, "
            f"reservoir={self.reservoir_filled}/{self.reservoir_size}, device={self.device})"
        )


# ============================================================================ search
def _row_subset(weights: torch.Tensor | Sequence[torch.Tensor], max_rows: int):
    """About ``max_rows`` evenly spaced rows of the group, spread over its members by size."""
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    total = sum(w.shape[0] for w in ws)
    if total <= max_rows:
        return ws
    step = -(-total // max_rows)
    return [w[::step] for w in ws]


def _as_weight(weights: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """One float32 [ΣN_i, K] matrix: members of a group share the input and s, and RTN groups are
    per row, so quantizing the concatenation equals quantizing each member."""
    if isinstance(weights, torch.Tensor):
        ws = [weights]
    else:
        ws = list(weights)
    if not ws:
        raise ValueError("empty weight group")
    k = ws[0].shape[-1]
    for w in ws:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weights of a group must be 2-D with the same K={k}, got {tuple(w.shape)}")
    w = ws[0] if len(ws) == 1 else torch.cat([w.to(ws[0].device) for w in ws], dim=0)
    return w.detach().to(torch.float32)


def fake_quant_f32(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 [N, K] bit-identical to :func:`sglang_er.quant.quantizer.fake_quant` (``w`` float32).

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
    weights: torch.Tensor | Sequence[torch.Tensor],
    x_sample: torch.Tensor,
    scales: Sequence[torch.Tensor],
    group_size: int,
) -> torch.Tensor:
    """``Σ_i ||x W_iᵀ − (x/s) Q(W_i · diag(s))ᵀ||²`` on ``x_sample [R, K]`` for each ``s`` in
    ``scales``; float32 [len(scales)] on the weights' device (no host sync).

    Computed as ``||x · (W − Q(W·diag(s)) / s)ᵀ||²``: one RTN pass and one matmul per candidate.
    """
    w = _as_weight(weights)
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
    weights: torch.Tensor | Sequence[torch.Tensor],
    x_mean_abs: torch.Tensor,
    x_sample: torch.Tensor,
    group_size: int | None = None,
    betas: Iterable[float] | None = None,
    *,
    return_all: bool = False,
):
    """AWQ scale search for a group of linears sharing one input (qkv; gate_up; o; down).

    weights:     ``W_i [N_i, K]`` (a list, or one already-fused tensor), any dtype/device.
    x_mean_abs:  ``[K]`` running mean of ``|x|`` (:meth:`ActivationStats.mean_abs`).
    x_sample:    ``[R, K]`` input rows (:meth:`ActivationStats.sample`) for the objective.
    group_size:  quantization group (default :func:`choose_group_size` (K)).
    betas:       grid of exponents (default ``linspace(0, 1, 11)``); 0 (RTN) is always added.

    For each β: ``s = awq_scales(x_mean_abs, β)`` and the output error
    ``Σ_i ||x W_iᵀ − (x/s) Q(W_i · diag(s))ᵀ||²`` on the sample. Returns ``(s [K] float32, β,
    err)`` for the minimum (ties go to the smaller β, so RTN wins ties); with
    ``return_all=True`` ``(s, β, err, betas list, errs [n_betas] float32 CPU)``. Vectorised over
    rows, groups and channels; the only Python loop is over β. One host sync (the argmin).
    """
    w = _as_weight(weights)
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


# ============================================================================ convenience
@dataclass
class AWQChoice:
    """The scaling chosen for one linear group.

    ``s`` float32 [K] (ones for RTN); ``beta``; ``err`` / ``err_rtn`` the summed squared output
    error of the choice / of RTN on the sample; ``ref`` = ``||x Wᵀ||²`` on the sample (for
    relative errors); ``fallback`` True when RTN was used without a search (cold start);
    ``tokens`` the rows behind the statistics; ``candidates`` how many β were scored.
    """

    s: torch.Tensor
    beta: float
    err: float = float("nan")
    err_rtn: float = float("nan")
    ref: float = float("nan")
    fallback: bool = False
    tokens: int = 0
    candidates: int = 0  # number of β values scored (0 for a fallback)

    @property
    def rel_err(self) -> float:
        return self.err / self.ref if self.ref > 0 else float("nan")

    @property
    def rel_err_rtn(self) -> float:
        return self.err_rtn / self.ref if self.ref > 0 else float("nan")


WeightGroup = torch.Tensor | Sequence[torch.Tensor]


class AWQQuantizer:
    """Per-(layer, group) activation statistics and the per-update β search.

    Typical use::

        awq = AWQQuantizer(min_tokens=512)
        # during rollouts, on sampled forwards (LiveStats), with the target's inputs of each linear:
        awq.observe(layer_idx, "qkv", x_qkv)  # ... "o", "gate_up", "down"
        # after each weight update, before re-quantizing the drafter, per layer:
        choices = awq.search_layer(layer_idx, weights)  # {group: AWQChoice}
        # qkv / gate_up: norm copy = fold_into_norm(norm, c.s); W4 of scale_weight(W, c.s)
        # o / down:      W4Linear.requantize_(W, input_scale=c.s)

    ``stats_kwargs`` go to every :class:`ActivationStats` (decay, max_tokens, reservoir_size,
    ...); stats are created lazily on the first ``observe`` of a (layer, group), on ``x``'s
    device (or ``device`` if given). ``min_tokens`` is compared with ``tokens_used`` (rows that
    entered the statistics).

    Warm start: weight updates move the best β very little, so after the first full-grid search
    of a group, the next ``full_search_every - 1`` searches only score
    ``{0, β_prev - local_step, β_prev, β_prev + local_step}`` (RTN stays a candidate); every
    ``full_search_every``-th search, or ``full=True``, scans the whole grid again.
    ``local_step=None`` always scans the whole grid.

    ``max_rows``: the β search scores at most this many evenly spaced output rows of a group's
    weight (RTN groups are per row, so a row subset gives an unbiased estimate of the output
    error); the chosen ``s`` then quantizes every row. This keeps a whole-model search at a
    fraction of one RTN pass (Qwen2-0.5B: ~0.3 s for all 96 groups on 2 CPU cores).
    """

    def __init__(
        self,
        *,
        min_tokens: int = 256,
        betas: Iterable[float] | None = None,
        group_size: int | None = None,
        sample_every: int = 1,
        device: str | torch.device | None = None,
        local_step: float | None = 0.1,
        full_search_every: int = 8,
        max_rows: int | None = 256,
        **stats_kwargs,
    ):
        self.min_tokens = int(min_tokens)
        self.max_rows = None if max_rows is None else int(max_rows)
        self.local_step = None if local_step is None else float(local_step)
        self.full_search_every = max(1, int(full_search_every))
        # (layer, group) -> (last chosen β, searches since the last full-grid search)
        self.last: dict[tuple[int, str], tuple[float, int]] = {}
        self.betas = tuple(DEFAULT_BETAS if betas is None else (float(b) for b in betas))
        self.group_size = group_size
        self.sample_every = int(sample_every)
        self.device = None if device is None else torch.device(device)
        self.stats_kwargs = dict(stats_kwargs)
        self.stats: dict[tuple[int, str], ActivationStats] = {}

    def observe(self, layer: int, group: str, x: torch.Tensor) -> None:
        """Feed the (target's) input ``x [..., K]`` of linear group ``group`` of layer ``layer``."""
        if group not in LINEAR_GROUPS:
            raise ValueError(f"unknown linear group {group!r}; expected one of {LINEAR_GROUPS}")
        key = (int(layer), group)
        st = self.stats.get(key)
        if st is None:
            dev = self.device if self.device is not None else x.device
            kw = dict(self.stats_kwargs)
            kw.setdefault("seed", 1000 * key[0] + LINEAR_GROUPS.index(group))
            st = self.stats[key] = ActivationStats(x.shape[-1], dev, **kw)
        st.update(x)

    def ready(self, layer: int, group: str) -> bool:
        st = self.stats.get((int(layer), group))
        return st is not None and st.tokens_used >= self.min_tokens and st.reservoir_filled > 0

    @torch.no_grad()
    def choose(self, layer: int, group: str, weights: WeightGroup, full: bool = False) -> AWQChoice:
        """The :class:`AWQChoice` for one linear group (RTN fallback on cold start; see the
        class docstring for the warm-started local search)."""
        st = self.stats.get((int(layer), group))
        if not self.ready(layer, group):
            first = weights if isinstance(weights, torch.Tensor) else weights[0]
            return AWQChoice(
                torch.ones(first.shape[-1], dtype=torch.float32, device=first.device),
                0.0,
                fallback=True,
                tokens=0 if st is None else st.tokens_used,
            )
        if self.max_rows is not None:
            weights = _row_subset(weights, self.max_rows)
        w = _as_weight(weights)
        k = w.shape[1]
        if st.num_channels != k:
            raise ValueError(f"layer {layer} {group}: stats have {st.num_channels} channels, weight has K={k}")
        g = choose_group_size(k) if self.group_size is None else self.group_size
        key = (int(layer), group)
        prev = self.last.get(key)
        if full or prev is None or self.local_step is None or prev[1] + 1 >= self.full_search_every:
            betas, since = self.betas, 0
        else:
            b, d = prev[0], self.local_step
            lo, hi = min(self.betas), max(self.betas)
            betas = sorted({round(min(max(v, lo), hi), 6) for v in (b - d, b, b + d)})
            since = prev[1] + 1
        x = st.sample()
        s, beta, err, grid, errs = search_scales(w, st.mean_abs(), x, g, betas, return_all=True)
        ref = float((x.to(w.device, torch.float32) @ w.t()).pow(2).sum())
        self.last[key] = (beta, since)
        return AWQChoice(s, beta, err, float(errs[grid.index(0.0)]), ref, False, st.tokens_used, len(grid))

    def search_layer(self, layer: int, weights: dict[str, WeightGroup], full: bool = False) -> dict[str, AWQChoice]:
        """``{group: AWQChoice}`` for the groups in ``weights`` (e.g. ``{"qkv": W_qkv, "o": W_o, ...}``)."""
        return {group: self.choose(layer, group, w, full) for group, w in weights.items()}

    def search(self, layer_weights: Sequence[dict[str, WeightGroup]], full: bool = False) -> list[dict[str, AWQChoice]]:
        """Per layer ``{group: AWQChoice}`` for the whole model (``full``: whole β grid everywhere)."""
        return [self.search_layer(i, lw, full) for i, lw in enumerate(layer_weights)]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """``{"stats": {"<layer>.<group>": ActivationStats state}, "last": {...: [β, since]}}``."""
        return {
            "stats": {f"{layer}.{group}": st.state_dict() for (layer, group), st in self.stats.items()},
            "last": {f"{layer}.{group}": list(v) for (layer, group), v in self.last.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for key, v in state.get("last", {}).items():
            layer_s, group = key.split(".", 1)
            self.last[(int(layer_s), group)] = (float(v[0]), int(v[1]))
        for key, sd in state["stats"].items():
            layer_s, group = key.split(".", 1)
            k = (int(layer_s), group)
            if k in self.stats:
                self.stats[k].load_state_dict(sd)
            else:
                self.stats[k] = ActivationStats.from_state_dict(sd, self.device or sd["sum_abs"].device)


# ============================================================================ HF helpers
def hf_llama_layer_weights(model) -> list[dict[str, list[torch.Tensor]]]:
    """``[{group: [W_i ...]}]`` per decoder layer of a transformers Llama/Qwen2-style model
    (``model.model.layers[i].self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``)."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out.append(
            {
                "qkv": [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight],
                "o": [a.o_proj.weight],
                "gate_up": [m.gate_proj.weight, m.up_proj.weight],
                "down": [m.down_proj.weight],
            }
        )
    return out


def register_hf_llama_hooks(model, awq: AWQQuantizer) -> list:
    """Forward pre-hooks feeding every linear group's input of a transformers Llama-style model
    into ``awq.observe``; returns the handles (call ``.remove()`` on each to detach)."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        for group, mod in (("qkv", a.q_proj), ("o", a.o_proj), ("gate_up", m.gate_proj), ("down", m.down_proj)):

            def hook(_mod, args, _i=i, _g=group):
                awq.observe(_i, _g, args[0])

            handles.append(mod.register_forward_pre_hook(hook))
    return handles
