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
    (at most ``max_tokens`` random rows per call; :class:`~sglang_er.quant.live_stats.LiveStats`
    feeds only every ``sample_every``-th target forward) and slowly decaying, so the statistics
    follow the rollout data distribution. They describe *data*, not weights: they are kept
    across weight updates, and every re-quantization re-runs the (cheap) β search with the new
    weights against the same statistics.
:class:`AWQQuantizer`
    one :class:`ActivationStats` per (layer, linear group); :meth:`AWQQuantizer.search` returns
    an :class:`AWQChoice` (``s``, ``β``, error) per linear, falling back to RTN (``s = 1``)
    while fewer than ``min_tokens`` tokens have been observed (cold start).
:mod:`sglang_er.quant.awq_search`
    the β grid search for one group of linears that share an input (:func:`search_scales`) and
    :func:`fold_into_norm`: where the group's input is an RMSNorm output, ``1/s`` folds into the
    norm weight and the W4 layer needs no division at run time.

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

from sglang_er.quant.awq_search import DEFAULT_BETAS, WeightGroup, as_weight, row_subset, search_scales
from sglang_er.quant.quantizer import choose_group_size

__all__ = ["LINEAR_GROUPS", "FOLD_TARGET", "ActivationStats", "AWQChoice", "AWQQuantizer"]

#: The four linear groups of a decoder layer, in drafter order; members of a group share an input.
LINEAR_GROUPS = ("qkv", "o", "gate_up", "down")
#: Group -> the RMSNorm whose weight absorbs ``1/s`` (None: W4Linear divides via input_scale).
FOLD_TARGET = {"qkv": "input_layernorm", "gate_up": "post_attention_layernorm", "o": None, "down": None}


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
        max_tokens: int = 256,
        reservoir_size: int = 128,
        reservoir_per_update: int | None = None,
        reservoir_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if max_tokens < 1 or reservoir_size < 1:
            raise ValueError("max_tokens and reservoir_size must be >= 1")
        self.num_channels = int(num_channels)
        self.device = torch.device(device if device is not None else "cpu")
        self.decay = float(decay)
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

    # ------------------------------------------------------------------ read-out
    def mean_abs(self) -> torch.Tensor:
        """Running mean of ``|x|`` per channel, float32 [K] on ``device`` (zeros before any update)."""
        return self.sum_abs / self.weight.clamp_min(1e-30)

    def sample(self) -> torch.Tensor:
        """The reservoir's valid rows ``[R', K]`` (R' = ``reservoir_filled``), oldest first not guaranteed."""
        return self.reservoir[: self.reservoir_filled]

    def __repr__(self) -> str:
        return (
            f"ActivationStats(K={self.num_channels}, decay={self.decay}, tokens_used={self.tokens_used}, "
            f"reservoir={self.reservoir_filled}/{self.reservoir_size}, device={self.device})"
        )


# ============================================================================ per-layer choice
@dataclass
class AWQChoice:
    """The scaling chosen for one linear group.

    ``s`` float32 [K] (ones for RTN); ``beta``; ``err`` the summed squared output error of the
    choice on the (row-subsampled) sample; ``fallback`` True when RTN was used without a search
    (cold start); ``tokens`` the rows behind the statistics; ``candidates`` how many β were scored.
    """

    s: torch.Tensor
    beta: float
    err: float = float("nan")
    fallback: bool = False
    tokens: int = 0
    candidates: int = 0  # number of β values scored (0 for a fallback)


class AWQQuantizer:
    """Per-(layer, group) activation statistics and the per-update β search.

    Typical use::

        awq = AWQQuantizer(min_tokens=512)
        # during rollouts, on sampled forwards (LiveStats), with the target's inputs of each linear:
        awq.observe(layer_idx, "qkv", x_qkv)  # ... "o", "gate_up", "down"
        # after each weight update, before re-quantizing the drafter, per layer:
        choices = awq.search_layer(layer_idx, weights)  # {group: AWQChoice}
        # qkv / gate_up: norm copy = fold_into_norm(norm, c.s); W4Linear.requantize_(W, weight_scale=c.s)
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
            weights = row_subset(weights, self.max_rows)
        w = as_weight(weights)
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
        s, beta, err, grid, _ = search_scales(w, st.mean_abs(), st.sample(), g, betas, return_all=True)
        self.last[key] = (beta, since)
        return AWQChoice(s, beta, err, False, st.tokens_used, len(grid))

    def search_layer(self, layer: int, weights: dict[str, WeightGroup], full: bool = False) -> dict[str, AWQChoice]:
        """``{group: AWQChoice}`` for the groups in ``weights`` (e.g. ``{"qkv": W_qkv, "o": W_o, ...}``)."""
        return {group: self.choose(layer, group, w, full) for group, w in weights.items()}

    def search(self, layer_weights: Sequence[dict[str, WeightGroup]], full: bool = False) -> list[dict[str, AWQChoice]]:
        """Per layer ``{group: AWQChoice}`` for the whole model (``full``: whole β grid everywhere)."""
        return [self.search_layer(i, lw, full) for i, lw in enumerate(layer_weights)]
