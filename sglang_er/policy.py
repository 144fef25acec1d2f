"""When to speculate: a roofline cost model of the machine, an acceptance model, a γ policy.

Each decode iteration the EFFROLLOUT worker picks γ ∈ {0} ∪ ladder: γ = 0 is one plain
target forward (1 token per request); γ ≥ 1 is γ lean W4-drafter steps plus one target verify
over γ+1 tokens per request, which commits E[L|γ] = 1 + Σ_{k=1..γ} Π_{j=1..k} α_j tokens per
request (α_j: probability the j-th draft is accepted given drafts 1..j-1 were). It pays while
the target forward is memory-bound: verifying γ+1 tokens then costs about one weight read,
like a single decode. RL rollouts start with a large batch (compute-bound, no gain) and end in
a long tail of few requests (memory/overhead-bound, large gain), so γ must follow the batch.

Pieces (no SGLang import; torch is optional, tensors are read with ``.tolist()``):

* :class:`ModelCost`: bytes and flops of the target and the drafter, from the model's shapes.
* :class:`CostModel`: predicted seconds of a plain forward, a draft step, a verify; roofline
  ``max(bytes/BW, flops/F) + per_seq·B + fixed`` with KV traffic from every request's own
  length and radix-shared prefixes (:data:`KV_READ_RULE`), corrected live from measurements.
* :class:`AcceptanceModel`: per-position acceptance rates from a recent window, per request
  when a request has history.
* :class:`Policy`: γ* = argmax expected tokens/s, with hysteresis; a fixed-γ mode.

Units throughout: bytes, flop, seconds, tokens. ``seq_lens`` [B] are the committed lengths
(tokens that already have KV) of the B requests in the batch; the token being decoded (x0)
has no KV yet, as in :mod:`sglang_er.worker`.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from sglang_er.calibration import CalibrationSample, HardwareProfile

__all__ = [
    "KV_READ_RULE",
    "KV_TRAFFIC_FACTOR",
    "PHASES",
    "ModelCost",
    "BatchStats",
    "batch_stats",
    "Work",
    "Observation",
    "CostModel",
    "AcceptanceModel",
    "Decision",
    "Policy",
]

# How many times an attention kernel reads KV pages that several requests share through the
# radix cache (a common prompt, or GRPO's n samples of one prompt):
#   per_request: each request streams its whole KV, shared pages included. SGLang's
#     torch_native backend gathers every request's KV separately (k_cache[req_to_token[...]]);
#     flashinfer's BatchDecodeWithPagedKVCacheWrapper and SGLang's triton decode kernel walk
#     each request's page table independently. (On a GPU the L2 may absorb some repeats; the
#     live correction picks that up.)
#   shared_once: a cascade / shared-prefix kernel (flashinfer's MultiLevelCascadeAttention)
#     attends the shared prefix once for the whole group and merges states, so shared pages
#     are read once per group.
KV_READ_RULE: dict[str, str] = {
    "torch_native": "per_request",
    "flashinfer": "per_request",
    "flashinfer_cascade": "shared_once",
    "triton": "per_request",
}
_RULES = ("per_request", "shared_once")

# KV bytes actually moved per KV byte attended. torch_native materialises each request's KV
# with an index gather (read the pool + write a copy) and SDPA then reads the copy: ~3×.
# Fused paged kernels read the pool once.
KV_TRAFFIC_FACTOR: dict[str, float] = {
    "torch_native": 3.0,
    "flashinfer": 1.0,
    "flashinfer_cascade": 1.0,
    "triton": 1.0,
}

PHASES = ("plain", "draft", "verify")
# The drafter's first step of an iteration also gathers every layer's committed KV, which the
# later steps reuse: a draft of γ steps costs about (γ + κ) steps. κ is measured from iterations
# with γ ≥ 2 (first step against the rest); gsm8k-lm on this CPU showed κ = 0.4-1.0 across
# B = 1-32. DRAFT_SETUP_PRIOR is κ before any measurement; DRAFT_SETUP_MAX bounds one outlier.
DRAFT_SETUP_PRIOR = 0.5
DRAFT_SETUP_MAX = 4.0
_SUPPORTED_GROUPS = (128, 64, 32)  # == sglang_er.quantizer.SUPPORTED_GROUP_SIZES (tested)


def _w4_group(k: int, preferred: int) -> int:
    """The group size sglang_er.quantizer.choose_group_size picks for in_features ``k``."""
    for g in _SUPPORTED_GROUPS:
        if g <= preferred and k % g == 0:
            return g
    raise ValueError(f"no 4-bit group size <= {preferred} divides in_features={k}")


# ====================================================================== model cost
@dataclass(frozen=True)
class ModelCost:
    """Bytes and flops of one decoder-only transformer (Llama/Qwen2 family: GQA attention,
    SwiGLU MLP, RMSNorm) and of its W4 self-drafter.

    Shapes: ``num_layers`` L, ``hidden`` D, ``intermediate`` I, ``num_heads`` H,
    ``num_kv_heads`` KVH, ``head_dim`` hd, ``vocab`` V. ``dtype_bytes``: target weights and
    activations (2 = bf16); ``kv_dtype_bytes``: KV cache (default = dtype_bytes).
    Drafter: every decoder linear (fused qkv, o, fused gate_up, down) in 4 bits, 0.5 byte per
    parameter plus ``w4_group_bytes`` per group of ``group_size`` input channels for its scale
    and zero point (4.0: bf16 scale + bf16 zero, the CPU int4pack layout; Marlin is 2.5);
    norms/biases/embedding shared with the target; the lm_head shared in bf16, or its own W4
    copy with ``w4_head``. ``logits_bytes``: bytes per vocabulary entry of a token's logits
    (fp32 = 4), written once per scored token.
    """

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: float = 2.0
    kv_dtype_bytes: Optional[float] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    group_size: int = 128
    w4_group_bytes: float = 4.0
    w4_head: bool = False
    w8_head: bool = False  # the drafter's int8 per-row copy of the head (1 byte/param + a scale per row)
    logits_bytes: float = 4.0

    def __post_init__(self):
        for name in ("num_layers", "hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim", "vocab"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelCost.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.dtype_bytes <= 0 or self.logits_bytes < 0 or self.w4_group_bytes < 0:
            raise ValueError("dtype_bytes must be > 0; logits_bytes and w4_group_bytes >= 0")
        if self.kv_dtype_bytes is None:
            object.__setattr__(self, "kv_dtype_bytes", self.dtype_bytes)
        elif self.kv_dtype_bytes <= 0:
            raise ValueError(f"kv_dtype_bytes must be > 0, got {self.kv_dtype_bytes}")
        for _, k in self.linear_shapes():  # fail now, not mid-serving, if a K cannot be W4-grouped
            _w4_group(k, self.group_size)
        if self.w4_head:
            _w4_group(self.hidden, self.group_size)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "ModelCost":
        """From an HF ``config.json`` dict (Llama / Qwen2 / Mistral style keys)."""
        if hasattr(config, "to_dict"):
            config = config.to_dict()

        def need(key):
            if key not in config:
                raise ValueError(f"model config has no {key!r}; cannot build its cost model")
            return config[key]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")
        dtype_bytes = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}.get(dtype)
        if dtype_bytes is None:
            raise ValueError(f"model config dtype {dtype!r} is not one of bfloat16/float16/float32")
        # Qwen2 has q/k/v biases without saying so in config.json; Llama says attention_bias.
        bias = bool(config.get("attention_bias", config.get("model_type") in ("qwen2", "qwen2_moe")))
        kw = dict(
            num_layers=int(need("num_hidden_layers")),
            hidden=hidden,
            intermediate=int(need("intermediate_size")),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(need("vocab_size")),
            dtype_bytes=float(dtype_bytes),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bias,
        )
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------------ shapes
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out N, in K) of one layer's linears as SGLang fuses them: qkv, o, gate_up, down."""
        D, H, KVH, hd, I = self.hidden, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate
        return [((H + 2 * KVH) * hd, D), (D, H * hd), (2 * I, D), (D, I)]

    @property
    def layer_linear_params(self) -> int:
        return sum(n * k for n, k in self.linear_shapes())

    @property
    def layer_small_params(self) -> int:
        """Norms (2 per layer) and q/k/v biases: kept in bf16 and shared by the drafter."""
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return 2 * self.hidden + bias

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def num_params(self) -> int:
        """Unique parameters (a tied lm_head counted once)."""
        per_layer = self.layer_linear_params + self.layer_small_params
        embed = self.head_params * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + self.hidden  # + final norm

    # ------------------------------------------------------------------ bytes
    @property
    def target_weight_bytes(self) -> float:
        """Bytes of all target weights in memory (embedding + layers + head, tied once)."""
        return self.num_params * self.dtype_bytes

    @property
    def target_read_bytes(self) -> float:
        """Weight bytes one target forward streams: all layers + final norm + lm_head.
        The embedding lookup touches only B rows (negligible), so an untied embedding is not read."""
        per_layer = self.layer_linear_params + self.layer_small_params
        return (self.num_layers * per_layer + self.hidden + self.head_params) * self.dtype_bytes

    def _w4_bytes(self, n: int, k: int) -> float:
        g = _w4_group(k, self.group_size)
        return n * k * 0.5 + n * (k // g) * self.w4_group_bytes

    @property
    def drafter_layer_bytes(self) -> float:
        """W4 decoder linears of all layers: packed nibbles + per-group scale/zero."""
        return self.num_layers * sum(self._w4_bytes(n, k) for n, k in self.linear_shapes())

    @property
    def head_bytes(self) -> float:
        """lm_head bytes one drafter step reads: the target's bf16 head, or its W4 copy."""
        if self.w4_head:
            return self._w4_bytes(self.vocab, self.hidden)
        if self.w8_head:
            return self.vocab * (self.hidden + self.dtype_bytes)
        return self.head_params * self.dtype_bytes

    @property
    def drafter_weight_bytes(self) -> float:
        """Extra memory the drafter owns: the W4 linears (+ the W4 head when not shared)."""
        return self.drafter_layer_bytes + (self.head_bytes if self.w4_head or self.w8_head else 0.0)

    @property
    def draft_read_bytes(self) -> float:
        """Weight bytes one drafter step streams: W4 layers, shared bf16 norms/biases, head."""
        shared_small = (self.num_layers * self.layer_small_params + self.hidden) * self.dtype_bytes
        return self.drafter_layer_bytes + shared_small + self.head_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    # ------------------------------------------------------------------ flops
    @property
    def layer_flops_per_token(self) -> float:
        """Linear-layer flop per token, all layers (2 per multiply-add)."""
        return 2.0 * self.num_layers * self.layer_linear_params

    @property
    def head_flops_per_token(self) -> float:
        return 2.0 * self.head_params

    @property
    def flops_per_token(self) -> float:
        """Linear flop per decoded token (layers + head), attention excluded."""
        return self.layer_flops_per_token + self.head_flops_per_token

    @property
    def attn_flops_per_context_token(self) -> float:
        """Attention flop per (query token × attended context token): QKᵀ and PV, all layers."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim


# ====================================================================== batch description
SeqLens = Union[Sequence[int], Any]  # list/tuple of ints, or a tensor/array with .tolist()
PrefixGroups = Optional[Iterable[tuple[int, Iterable[int]]]]


@dataclass(frozen=True)
class BatchStats:
    """O(1) summary of a batch, computed once per decision in O(B).

    batch B; sum_len Σ_b L_b; max_len max_b L_b; shared_tokens: prefix tokens a shared-once
    kernel does not re-read (Σ over requests of the longest prefix shared with an earlier
    request), 0 without prefix groups.
    """

    batch: int
    sum_len: int
    max_len: int
    shared_tokens: int = 0

    @classmethod
    def uniform(cls, batch: int, seq_len: int) -> "BatchStats":
        return cls(batch=batch, sum_len=batch * seq_len, max_len=seq_len)

    def prefix_kv_tokens(self, rule: str) -> int:
        """KV tokens of the committed prefixes that the attention reads under ``rule``."""
        return self.sum_len - (self.shared_tokens if rule == "shared_once" else 0)


def _seq_len(v) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"seq_lens must be non-negative integers, got {v!r}")
    return v


def batch_stats(seq_lens: Union[SeqLens, BatchStats], prefix_groups: PrefixGroups = None) -> BatchStats:
    """Summarise ``seq_lens`` [B] (each request's own length) and radix ``prefix_groups``.

    ``prefix_groups``: (shared_prefix_len P, member indices) per group of requests whose first
    P tokens are the same cached pages. Groups may nest (a radix tree: 8 samples share the
    prompt, 4 of them also share a longer prefix). The pages a shared-once kernel reads are
    the union of the requests' paths in that tree: Σ_b L_b − Σ_b (longest prefix request b
    shares with a lower-indexed request) — for each group every member but the first saves P.
    """
    if isinstance(seq_lens, BatchStats):
        if prefix_groups:
            raise ValueError("pass prefix_groups with seq_lens, not with precomputed BatchStats")
        return seq_lens
    lens = seq_lens.tolist() if hasattr(seq_lens, "tolist") else list(seq_lens)
    if not lens:
        raise ValueError("seq_lens is empty: a decode batch has at least one request")
    # the hot path (a list of ints, once per decode iteration) runs at C speed
    if set(map(type, lens)) != {int} or min(lens) < 0:
        lens = [_seq_len(v) for v in lens]
    total, mx = sum(lens), max(lens)
    shared = 0
    if prefix_groups:
        B = len(lens)
        save: dict[int, int] = {}
        for gi, grp in enumerate(prefix_groups):
            try:
                plen, members = grp
                members = sorted(map(int, members))
            except (TypeError, ValueError):
                raise ValueError(f"prefix_groups[{gi}] must be (shared_prefix_len, member indices)") from None
            plen = int(plen)
            if not members:
                continue
            if plen < 0:
                raise ValueError(f"prefix_groups[{gi}]: shared prefix length {plen} < 0")
            if len(set(members)) != len(members):
                raise ValueError(f"prefix_groups[{gi}]: a request is listed twice")
            for m in (members[0], members[-1]):
                if not 0 <= m < B:
                    raise ValueError(f"prefix_groups[{gi}]: member {m} is not a request index in 0..{B - 1}")
            if min(map(lens.__getitem__, members)) < plen:
                m = next(m for m in members if lens[m] < plen)
                raise ValueError(f"prefix_groups[{gi}]: shared prefix {plen} is longer than request "
                                 f"{m}'s sequence ({lens[m]} tokens)")
            for m in members[1:]:  # the first member reads the prefix; the others share it
                if plen > save.get(m, 0):
                    save[m] = plen
        shared = sum(save.values())
    return BatchStats(batch=len(lens), sum_len=total, max_len=mx, shared_tokens=shared)


@dataclass(frozen=True)
class Work:
    """What one forward moves and computes. bytes: total, of which kv_bytes is attention KV
    traffic; flops by component: ``target`` (a target forward, at the target's compute rate)
    or ``layers`` / ``head`` (a draft step: W4 layers at the ``w4`` rate, the head at the bf16
    or ``w4`` rate); batch: requests."""

    bytes: float
    kv_bytes: float
    flops: dict
    batch: int


@dataclass(slots=True)  # not frozen: built on every measured phase, and frozen init costs 2x
class Observation:
    """Result of :meth:`CostModel.observe` (seconds, and relative errors |pred − meas| / meas)."""

    phase: str
    measured_s: float
    predicted_raw_s: float  # profile only
    predicted_s: float  # with the multiplier in force before this observation
    rel_err_raw: float
    rel_err: float
    bw_util: float  # predicted bytes / measured seconds / BW
    multiplier: float  # after the update


# ====================================================================== cost model
class _LineFit:
    """y ≈ a + b·x by least squares with exponential forgetting (factor ``decay`` per point),
    b ≥ 0; ``intercept="nonneg"`` also keeps a ≥ 0 (a line through the origin otherwise). O(1)
    per point."""

    __slots__ = ("decay", "nonneg", "s1", "sx", "sxx", "sy", "sxy", "n", "_coef", "_spread")

    def __init__(self, decay: float = 0.97, intercept: str = "nonneg"):
        self.decay = decay
        self.nonneg = intercept == "nonneg"
        self.s1 = self.sx = self.sxx = self.sy = self.sxy = 0.0
        self.n = 0
        self._coef = self._spread = None  # cached between points: predictions run per candidate γ

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.s1, self.sx, self.sxx = d * self.s1 + 1.0, d * self.sx + x, d * self.sxx + x * x
        self.sy, self.sxy = d * self.sy + y, d * self.sxy + x * y
        self.n += 1
        self._coef = self._spread = None

    def spread(self) -> float:
        """Coefficient of variation of the (weighted) x seen: how well b is determined."""
        if self._spread is None:
            mx = self.sx / self.s1 if self.s1 else 0.0
            var = max(0.0, self.sxx / self.s1 - mx * mx) if self.s1 else 0.0
            self._spread = math.sqrt(var) / abs(mx) if mx else 0.0
        return self._spread

    def coef(self) -> tuple[float, float]:
        if self._coef is None:
            self._coef = self._solve()
        return self._coef

    def _solve(self) -> tuple[float, float]:
        mx, my = self.sx / self.s1, self.sy / self.s1
        var = self.sxx / self.s1 - mx * mx
        b = max(0.0, (self.sxy / self.s1 - mx * my) / var) if var > 1e-9 * max(1.0, mx * mx) else 0.0
        a = my - b * mx
        if self.nonneg and a < 0.0:  # a line through the origin instead
            a, b = 0.0, (self.sxy / self.sxx if self.sxx > 0 else 0.0)
        return a, max(0.0, b)

    def predict(self, x: float) -> float:
        a, b = self.coef()
        return a + b * x


class CostModel:
    """Predicted seconds of the three forwards of a decode iteration on one machine.

    Every phase: ``mult_phase · [max(bytes/BW, Σ_k flops_k/F_k) + per_seq·B + fixed]``, where
    bytes = weights streamed + KV traffic + new KV written + logits written, KV traffic from
    each request's own length (and the radix sharing rule), never the batch mean: attention
    cost is linear in every length, but the padded drafter pays for the longest.

    * plain (γ = 0): target forward, 1 query token per request, attends L_b + 1 tokens.
    * draft step j (0..γ-1): lean W4 drafter, 1 token per request at position L_b + j. Its
      attention (``draft_kv_layout="padded"``, what :class:`sglang_er.drafter.Drafter` does)
      gathers a [B, max L + γ] KV index and runs SDPA with a mask, so every request streams
      max L + γ tokens, ~3× (gather read, copy write, SDPA read); ``"ragged"`` models a paged
      kernel with the target backend's rule and factor.
    * verify: target forward over γ+1 tokens per request; the kernel loads a request's KV once
      for all its γ+1 queries.

    ``mult_phase`` starts at 1 and follows measurements (:meth:`observe`): the first measurement
    sets it, then an EMA of log(measured / raw prediction) with weight ``ema``, per-observation
    ratio and multiplier clamped to [0.2, 5], so one outlier (a GC pause) cannot wreck the model.
    Once a phase has been measured over a spread of raw predictions, the correction becomes
    affine, a + b·raw (see :meth:`_correct`), still clamped to [0.2, 5]× raw. The scheduler's
    time around the forwards is learnt separately (:meth:`observe_outside`).
    """

    MULT_RANGE = (0.2, 5.0)

    def __init__(
        self,
        profile: HardwareProfile,
        model_cost: ModelCost,
        *,
        attention_backend: Optional[str] = None,
        kv_read_rule: Optional[str] = None,
        kv_traffic_factor: Optional[float] = None,
        draft_kv_layout: str = "padded",
        draft_kv_traffic_factor: float = 3.0,
        target_compute: str = "bf16",
        ema: float = 0.2,
        window: int = 256,
        warmup: int = 0,
        outside_warmup: int = 0,
    ):
        self.profile = profile
        self.model = model_cost
        backend = attention_backend or profile.attention_backend
        if kv_read_rule is None:
            if backend not in KV_READ_RULE:
                raise ValueError(f"attention backend {backend!r} has no known KV read rule; pass "
                                 f"kv_read_rule= one of {_RULES} (known backends: {', '.join(KV_READ_RULE)})")
            kv_read_rule = KV_READ_RULE[backend]
        if kv_read_rule not in _RULES:
            raise ValueError(f"kv_read_rule must be one of {_RULES}, got {kv_read_rule!r}")
        if draft_kv_layout not in ("padded", "ragged"):
            raise ValueError(f"draft_kv_layout must be 'padded' or 'ragged', got {draft_kv_layout!r}")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        self.attention_backend = backend
        self.kv_read_rule = kv_read_rule
        self.kv_traffic_factor = float(kv_traffic_factor if kv_traffic_factor is not None
                                       else KV_TRAFFIC_FACTOR.get(backend, 1.0))
        self.draft_kv_layout = draft_kv_layout
        self.draft_kv_traffic_factor = (float(draft_kv_traffic_factor) if draft_kv_layout == "padded"
                                        else self.kv_traffic_factor)
        self.ema = float(ema)
        m = model_cost
        # Constants of the hot path, hoisted once.
        self._bw = profile.bandwidth_bytes_per_s
        self._f_target = profile.flops(target_compute)
        self._f_draft_layers = profile.flops("w4")
        self._f_draft_head = profile.flops("w4" if m.w4_head else target_compute)
        self._kv_tok = m.kv_bytes_per_token
        self._logit_tok = m.vocab * m.logits_bytes
        self._attn = m.attn_flops_per_context_token
        # compute class of each Work.flops component (for calibration samples)
        self._class_of = {"target": target_compute, "layers": "w4", "head": "w4" if m.w4_head else target_compute}
        self._w_target = m.target_read_bytes
        self._w_draft = m.draft_read_bytes
        self._flops_tok = m.flops_per_token
        self._layer_flops_tok = m.layer_flops_per_token
        self._head_flops_tok = m.head_flops_per_token
        self.multiplier = {p: 1.0 for p in PHASES}
        self.draft_setup = DRAFT_SETUP_PRIOR  # κ: see DRAFT_SETUP_PRIOR
        self._hist = {p: deque(maxlen=window) for p in PHASES}
        self._count = {p: 0 for p in PHASES}
        # The first ``warmup`` phase / ``outside_warmup`` outside-time measurements of the process
        # are reported but not learnt from (not reset with the correction). Off in the server: its
        # first phase measurements must replace a profile that may be far off, and the one-time work
        # found inside an iteration (the drafter's AWQ switch) is kept out of the clock instead.
        self._warmup = {p: int(warmup) for p in PHASES}
        self._warmup_outside = {"plain": int(outside_warmup), "spec": int(outside_warmup)}
        self._outside = {"plain": _LineFit(), "spec": _LineFit()}  # scheduler time around the forwards
        self._fit = {p: _LineFit(intercept="any") for p in PHASES}  # measured vs raw prediction

    # ------------------------------------------------------------------ work accounting
    def batch_stats(self, seq_lens, prefix_groups: PrefixGroups = None) -> BatchStats:
        return batch_stats(seq_lens, prefix_groups)

    def work_plain(self, st: BatchStats) -> Work:
        B = st.batch
        kv_read = (st.prefix_kv_tokens(self.kv_read_rule) + B) * self._kv_tok * self.kv_traffic_factor
        byt = self._w_target + kv_read + B * (self._kv_tok + self._logit_tok)
        flops = B * self._flops_tok + self._attn * (st.sum_len + B)
        return Work(byt, kv_read, {"target": flops}, B)

    def work_verify(self, st: BatchStats, gamma: int) -> Work:
        B, q = st.batch, gamma + 1
        kv_read = (st.prefix_kv_tokens(self.kv_read_rule) + B * q) * self._kv_tok * self.kv_traffic_factor
        byt = self._w_target + kv_read + B * q * (self._kv_tok + self._logit_tok)
        # query i (0..γ) attends L_b + i + 1 tokens
        flops = B * q * self._flops_tok + self._attn * (q * st.sum_len + B * q * (q + 1) / 2)
        return Work(byt, kv_read, {"target": flops}, B)

    def work_draft_step(self, st: BatchStats, step: int, gamma: int) -> Work:
        B = st.batch
        if self.draft_kv_layout == "padded":
            ctx = B * (st.max_len + gamma)  # the worker's kv_index is [B, max L + γ] for every step
            kv_read = ctx * self._kv_tok * self.draft_kv_traffic_factor
        else:
            ctx = st.sum_len + B * (step + 1)
            kv_read = (st.prefix_kv_tokens(self.kv_read_rule) + B * (step + 1)) * self._kv_tok \
                * self.draft_kv_traffic_factor
        byt = self._w_draft + kv_read + B * (self._kv_tok + self._logit_tok)
        flops = {"layers": B * self._layer_flops_tok + self._attn * ctx, "head": B * self._head_flops_tok}
        return Work(byt, kv_read, flops, B)

    def _seconds(self, w: Work, phase: str) -> float:
        p = self.profile
        if phase == "draft":
            compute = w.flops["layers"] / self._f_draft_layers + w.flops["head"] / self._f_draft_head
            return max(w.bytes / self._bw, compute) + p.per_seq_draft_s * w.batch + p.fixed_draft_step_s
        compute = w.flops["target"] / self._f_target
        fixed = p.fixed_plain_s if phase == "plain" else p.fixed_verify_s
        return max(w.bytes / self._bw, compute) + p.per_seq_s * w.batch + fixed

    # ------------------------------------------------------------------ predictions
    @staticmethod
    def _check_gamma(gamma: int) -> int:
        if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
            raise ValueError(f"γ must be an integer >= 1 here, got {gamma!r}")
        return gamma

    def t_plain(self, seq_lens, prefix_groups: PrefixGroups = None, *, corrected: bool = True) -> float:
        """Seconds of one plain decode forward of the batch (γ = 0)."""
        st = batch_stats(seq_lens, prefix_groups)
        t = self._seconds(self.work_plain(st), "plain")
        return self._correct("plain", t) if corrected else t

    def t_draft_step(self, seq_lens, prefix_groups: PrefixGroups = None, *, step: int = 0,
                     gamma: Optional[int] = None, corrected: bool = True) -> float:
        """Seconds of drafter step ``step`` (0-based) of a γ-step draft (γ default step + 1)."""
        st = batch_stats(seq_lens, prefix_groups)
        gamma = step + 1 if gamma is None else self._check_gamma(gamma)
        if not 0 <= step < gamma:
            raise ValueError(f"draft step {step} is outside 0..γ-1 = 0..{gamma - 1}")
        t = self._seconds(self.work_draft_step(st, step, gamma), "draft")
        return self._correct("draft", t, steps=1) if corrected else t

    def t_draft(self, seq_lens, gamma: int, prefix_groups: PrefixGroups = None, *, corrected: bool = True) -> float:
        """Seconds of all γ drafter steps of one iteration (Σ_j T_D(step j))."""
        st = batch_stats(seq_lens, prefix_groups)
        gamma = self._check_gamma(gamma)
        if self.draft_kv_layout == "padded":  # every step identical
            t = gamma * self._seconds(self.work_draft_step(st, 0, gamma), "draft")
        else:
            t = sum(self._seconds(self.work_draft_step(st, j, gamma), "draft") for j in range(gamma))
        return self._correct("draft", t, steps=gamma) if corrected else t

    def t_verify(self, seq_lens, gamma: int, prefix_groups: PrefixGroups = None, *, corrected: bool = True) -> float:
        """Seconds of the target verify forward over γ+1 tokens per request."""
        st = batch_stats(seq_lens, prefix_groups)
        t = self._seconds(self.work_verify(st, self._check_gamma(gamma)), "verify")
        return self._correct("verify", t) if corrected else t

    def iteration_times(self, st: BatchStats, gammas: Sequence[int]) -> dict[int, float]:
        """Corrected seconds of one iteration for each γ in ``gammas`` (0 = plain), scheduler time
        included: :meth:`t_iteration` for a summarised batch without the argument checks.

        The policy's hot path (every decode iteration, every candidate γ), so the ``work_*`` /
        ``_seconds`` / ``_correct`` arithmetic is inlined here as plain float expressions; a test
        keeps it equal to :meth:`t_iteration`."""
        p, B, L, Lmax = self.profile, st.batch, st.sum_len, st.max_len
        P = st.prefix_kv_tokens(self.kv_read_rule)
        bw, kv_tok, kvf, attn = self._bw, self._kv_tok, self.kv_traffic_factor, self._attn
        out_tok = kv_tok + self._logit_tok  # bytes written per new token (its KV row, its logits)
        w_target, flops_tok, f_target = self._w_target, self._flops_tok, self._f_target
        seq_fixed_v = p.per_seq_s * B + p.fixed_verify_s
        padded = self.draft_kv_layout == "padded"
        if padded:
            d_kv = kv_tok * self.draft_kv_traffic_factor
            d_bytes0 = self._w_draft + B * out_tok
            d_flops0 = B * self._layer_flops_tok
            d_head = B * self._head_flops_tok / self._f_draft_head
            f_dl = self._f_draft_layers
            d_fixed = p.per_seq_draft_s * B + p.fixed_draft_step_s
        lo, hi = self.MULT_RANGE
        cor = {}
        for phase in PHASES:  # (a, b) of the affine correction, or (None, multiplier)
            fit = self._fit[phase]
            cor[phase] = fit.coef() if fit.n >= 3 and fit.spread() >= 0.25 else (None, self.multiplier[phase])
        out_plain, out_spec = self.t_outside(0, B), self.t_outside(1, B)
        kappa = self.draft_setup
        out = {}
        for g in gammas:
            if g == 0:
                byt = self._w_target + (P + B) * kv_tok * kvf + B * out_tok
                raw = max(byt / bw, (B * self._flops_tok + attn * (L + B)) / self._f_target) \
                    + p.per_seq_s * B + p.fixed_plain_s
                a, b = cor["plain"]
                out[g] = (raw * b if a is None else min(max(a + b * raw, lo * raw), hi * raw)) + out_plain
                continue
            q = g + 1
            byt = w_target + (P + B * q) * kv_tok * kvf + B * q * out_tok
            flops = B * q * flops_tok + attn * (q * L + B * q * (q + 1) / 2)
            t_v = max(byt / bw, flops / f_target) + seq_fixed_v
            a, b = cor["verify"]
            t_v = t_v * b if a is None else min(max(a + b * t_v, lo * t_v), hi * t_v)
            if padded:  # every step reads [B, max L + γ]
                ctx = B * (Lmax + g)
                t_d = g * (max((d_bytes0 + ctx * d_kv) / bw, (d_flops0 + attn * ctx) / f_dl + d_head) + d_fixed)
            else:
                t_d = sum(self._seconds(self.work_draft_step(st, j, g), "draft") for j in range(g))
            a, b = cor["draft"]  # per effective step (see _correct)
            u = t_d / g
            t_d = (g + kappa) * (u * b if a is None else min(max(a + b * u, lo * u), hi * u))
            out[g] = t_d + t_v + out_spec
        return out

    def t_iteration(self, seq_lens, gamma: int, prefix_groups: PrefixGroups = None, *, corrected: bool = True) -> float:
        """Seconds of one decode iteration at γ (γ = 0: plain; else draft + verify), and when
        ``corrected`` the measured scheduler time around the forwards."""
        st = batch_stats(seq_lens, prefix_groups)
        if gamma == 0:
            t = self.t_plain(st, corrected=corrected)
        else:
            t = self.t_draft(st, gamma, corrected=corrected) + self.t_verify(st, gamma, corrected=corrected)
        return t + self.t_outside(gamma, st.batch) if corrected else t

    # ------------------------------------------------------------------ time outside the forwards
    def observe_outside(self, gamma: int, batch: int, seconds: float) -> None:
        """Wall time of an iteration minus its forwards: the scheduler's result processing,
        streaming and KV bookkeeping. Learnt per mode (a speculative iteration commits more
        tokens per request) as a + b·B by least squares with exponential forgetting."""
        if batch < 1 or not (seconds >= 0 and math.isfinite(seconds)):
            return
        mode = "spec" if gamma else "plain"
        if self._warmup_outside[mode]:
            self._warmup_outside[mode] -= 1
            return
        self._outside[mode].add(float(batch), float(seconds))

    def t_outside(self, gamma: int, batch: int) -> float:
        """Predicted scheduler seconds around an iteration's forwards; a mode not yet seen
        borrows the other's fit (so an unmeasured mode is neither favoured nor penalised)."""
        mine, other = (self._outside["spec"], self._outside["plain"]) if gamma else (
            self._outside["plain"], self._outside["spec"])
        fit = mine if mine.n else other
        return fit.predict(batch) if fit.n else 0.0

    @property
    def outside_fit(self) -> dict[str, Optional[tuple[float, float]]]:
        """Per mode (a, b) of outside seconds = a + b·B, None before any observation."""
        return {m: (f.coef() if f.n else None) for m, f in self._outside.items()}

    def predicted_bytes(self, phase: str, seq_lens, gamma: int = 0, prefix_groups: PrefixGroups = None) -> float:
        """Bytes the phase moves (draft: all γ steps)."""
        st = batch_stats(seq_lens, prefix_groups)
        if phase == "plain":
            return self.work_plain(st).bytes
        gamma = self._check_gamma(gamma)
        if phase == "verify":
            return self.work_verify(st, gamma).bytes
        if phase == "draft":
            return sum(self.work_draft_step(st, j, gamma).bytes for j in range(gamma))
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")

    def calibration_sample(self, phase: str, seq_lens, gamma: int, seconds: float,
                           prefix_groups: PrefixGroups = None) -> CalibrationSample:
        """A :class:`~sglang_er.calibration.CalibrationSample` for a measured phase, with this
        model's byte/flop accounting (draft: all γ steps, ``forwards`` = γ), for fit_profile."""
        st = batch_stats(seq_lens, prefix_groups)
        if phase == "plain":
            works, n = [self.work_plain(st)], 1
        elif phase == "verify":
            works, n = [self.work_verify(st, self._check_gamma(gamma))], 1
        elif phase == "draft":
            n = self._check_gamma(gamma)
            works = [self.work_draft_step(st, j, n) for j in range(n)]
        else:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        flops: dict[str, float] = {}
        for w in works:
            for comp, f in w.flops.items():
                cls = self._class_of[comp]
                flops[cls] = flops.get(cls, 0.0) + f
        return CalibrationSample(phase=phase, bytes=sum(w.bytes for w in works), flops=flops,
                                 batch=st.batch, seconds=seconds, forwards=n)

    # ------------------------------------------------------------------ live correction
    def observe(self, phase: str, seq_lens, gamma: int, measured_seconds: float,
                prefix_groups: PrefixGroups = None) -> Observation:
        """Feed one measured phase time; returns the errors and moves the phase multiplier.

        ``phase``: "plain" (γ ignored), "draft" (``measured_seconds`` = all γ steps of the
        iteration), "verify". O(B) (for the batch summary) + O(γ).
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        meas = float(measured_seconds)
        if not (meas > 0 and math.isfinite(meas)):
            raise ValueError(f"measured_seconds must be a positive finite number, got {measured_seconds!r}")
        st = batch_stats(seq_lens, prefix_groups)
        if phase == "plain":
            w = self.work_plain(st)
            raw, byt = self._seconds(w, "plain"), w.bytes
        elif phase == "verify":
            w = self.work_verify(st, self._check_gamma(gamma))
            raw, byt = self._seconds(w, "verify"), w.bytes
        elif self.draft_kv_layout == "padded":  # every step identical
            w = self.work_draft_step(st, 0, self._check_gamma(gamma))
            raw, byt = gamma * self._seconds(w, "draft"), gamma * w.bytes
        else:
            ws = [self.work_draft_step(st, j, self._check_gamma(gamma)) for j in range(gamma)]
            raw, byt = sum(self._seconds(w, "draft") for w in ws), sum(w.bytes for w in ws)
        m_old = self.multiplier[phase]
        steps = gamma if phase == "draft" else 1
        pred = self._correct(phase, raw, steps)
        # the correction is learnt per unit: one effective draft step, or one forward
        u_raw, u_meas = (raw / steps, meas / (steps + self.draft_setup)) if phase == "draft" else (raw, meas)
        if phase == "draft":  # "raw": the profile with the draft's structure, (γ + κ) steps
            raw *= (steps + self.draft_setup) / steps
        if self._warmup[phase]:  # reported, never learnt from
            self._warmup[phase] -= 1
            return Observation(phase, meas, raw, pred, abs(raw - meas) / meas, abs(pred - meas) / meas,
                               byt / meas / self._bw, m_old)
        self._fit[phase].add(u_raw, u_meas)
        lo, hi = self.MULT_RANGE
        ratio = min(max(u_meas / u_raw, lo), hi)
        # the first measurement replaces the profile's guess outright; later ones are smoothed
        ema = self.ema if self._count[phase] else 1.0
        log_m = (1.0 - ema) * math.log(m_old) + ema * math.log(ratio)
        m_new = min(max(math.exp(log_m), lo), hi)
        self.multiplier[phase] = m_new
        obs = Observation(phase, meas, raw, pred, abs(raw - meas) / meas, abs(pred - meas) / meas,
                          byt / meas / self._bw, m_new)
        self._hist[phase].append((obs.rel_err_raw, obs.rel_err, obs.bw_util))
        self._count[phase] += 1
        return obs

    def observe_draft_setup(self, first_s: float, rest_s: float, gamma: int) -> None:
        """Learn κ from one draft of γ ≥ 2 steps: its first step took ``first_s`` seconds, the
        other γ − 1 together ``rest_s``. EMA with weight ``ema``, κ clamped to [0, DRAFT_SETUP_MAX]."""
        if gamma < 2 or not (first_s > 0 and rest_s > 0 and math.isfinite(first_s + rest_s)):
            return
        k = min(max(first_s * (gamma - 1) / rest_s - 1.0, 0.0), DRAFT_SETUP_MAX)
        self.draft_setup += self.ema * (k - self.draft_setup)

    def _correct(self, phase: str, raw: float, steps: int = 1) -> float:
        """The corrected prediction for a raw (profile) one. Once a phase has been measured over
        a spread of raw predictions (different batch sizes, lengths, γ), measured ≈ a + b·raw
        by least squares with forgetting: a profile's fixed overhead and its per-request slope
        are then corrected separately (a profile measured on a deeper model overestimates
        the first and underestimates the second -- no single factor fits both). Before that,
        the smoothed multiplier.

        The draft phase is corrected per effective step: ``steps`` = γ drafter steps cost
        (γ + κ)·c(raw / γ), κ the first step's KV gather (:meth:`observe_draft_setup`). Fitted per
        iteration instead, γ = 1 iterations across batch sizes taught a gsm8k-lm server a =
        −6.9 ms, b = 5.3 (the profile under-predicts the draft step's growth with B), which then
        priced γ = 7 at B = 1 at 72 ms against 18 ms measured: the policy kept γ = 1 for the
        whole tail, where γ = 7 ran 1.8x faster."""
        if phase == "draft":
            u = raw / steps
            return (steps + self.draft_setup) * self._correct_unit(phase, u)
        return self._correct_unit(phase, raw)

    def _correct_unit(self, phase: str, raw: float) -> float:
        fit = self._fit[phase]
        lo, hi = self.MULT_RANGE
        if fit.n >= 3 and fit.spread() >= 0.25:
            a, b = fit.coef()
            return min(max(a + b * raw, lo * raw), hi * raw)
        return raw * self.multiplier[phase]

    def observations(self, phase: str) -> int:
        """Measurements of ``phase`` since the last :meth:`reset_correction`."""
        return self._count[phase]

    def error_stats(self, last: Optional[int] = None) -> dict[str, dict[str, float]]:
        """Per phase, over the most recent ``last`` observations (default: the whole window):
        n (all observations seen), window (how many the means cover), mean_rel_err_raw (profile
        alone, "before correction"), mean_rel_err_corrected (the prediction in force when the
        measurement arrived, "after correction"), bw_util (mean achieved fraction of peak BW),
        multiplier (current)."""
        out = {}
        for p in PHASES:
            h = list(self._hist[p])
            if last is not None:
                h = h[-last:] if last > 0 else []
            k = len(h)
            out[p] = {
                "n": self._count[p],
                "window": k,
                "mean_rel_err_raw": sum(e[0] for e in h) / k if k else float("nan"),
                "mean_rel_err_corrected": sum(e[1] for e in h) / k if k else float("nan"),
                "bw_util": sum(e[2] for e in h) / k if k else float("nan"),
                "multiplier": self.multiplier[p],
            }
        return out

    def reset_correction(self) -> None:
        self.multiplier = {p: 1.0 for p in PHASES}
        self._fit = {p: _LineFit(intercept="any") for p in PHASES}
        self._outside = {"plain": _LineFit(), "spec": _LineFit()}
        for p in PHASES:
            self._hist[p].clear()
            self._count[p] = 0


# ====================================================================== acceptance
class _Counts:
    __slots__ = ("tried", "acc", "n")

    def __init__(self, g: int):
        self.tried = [0] * g
        self.acc = [0] * g
        self.n = 0

    def add(self, a: int, gamma: int, sign: int = 1) -> None:
        # Draft k (1-based) was tried iff drafts 1..k-1 were accepted (a >= k-1) and k <= γ;
        # accepted iff a >= k. Conditional rate α_k = acc_k / tried_k. ``sign``: how many such
        # records (negative: forget them).
        for k in range(min(a + 1, gamma)):
            self.tried[k] += sign
        for k in range(a):
            self.acc[k] += sign
        self.n += sign


def expected_lengths(alphas: Iterable[float]) -> list[float]:
    """[E[L|γ] for γ = 0..len(alphas)] from conditional rates α_k: 1 + Σ_{k≤γ} Π_{j≤k} α_j."""
    table, run, e = [1.0], 1.0, 1.0
    for a in alphas:
        run *= a  # P(drafts 1..k all accepted)
        e += run
        table.append(e)
    return table


class AcceptanceModel:
    """Per-position conditional acceptance α_k (k = 1..γmax) and E[L|γ].

    Server-wide: counts over the last ``window`` (request, iteration) records. Shrinkage keeps
    thin positions sane: α_k = (acc_k + w·ᾱ) / (tried_k + w) with w = ``prior_weight`` and ᾱ the
    pooled rate over all positions, itself shrunk to ``prior_alpha`` — cold start gives the
    prior, and a deep position rarely tried (γ was small lately) follows the pooled rate.
    Per request: once ``rid`` has ``request_min_obs`` observations its own counts are used,
    shrunk towards the server-wide α_k with weight ``request_weight``. At most ``max_requests``
    requests are tracked (least recently updated dropped), so a missing :meth:`forget` only
    costs memory up to that bound.
    """

    def __init__(self, gamma_max: int, window: int = 4096, prior_alpha: float = 0.7,
                 prior_weight: float = 8.0, request_min_obs: int = 8, request_weight: float = 8.0,
                 max_requests: int = 65536):
        if not isinstance(gamma_max, int) or gamma_max < 1:
            raise ValueError(f"gamma_max must be an integer >= 1, got {gamma_max!r}")
        if not 0.0 <= prior_alpha < 1.0:
            raise ValueError(f"prior_alpha must be in [0, 1), got {prior_alpha}")
        if window < 1 or prior_weight <= 0 or request_weight <= 0 or request_min_obs < 1:
            raise ValueError("window, request_min_obs >= 1 and prior_weight, request_weight > 0 required")
        self.gamma_max = gamma_max
        self.window = int(window)
        self.prior_alpha = float(prior_alpha)
        self.prior_weight = float(prior_weight)
        self.request_min_obs = int(request_min_obs)
        self.request_weight = float(request_weight)
        self.max_requests = int(max_requests)
        self._srv = _Counts(gamma_max)
        self._recent: deque[list[int]] = deque()  # [γ, accept_len, records], oldest first
        self._req: "OrderedDict[Any, _Counts]" = OrderedDict()
        self._srv_alphas: Optional[list[float]] = None
        # the last batch_expected_tokens answer: (rids, answer); any new record clears it, so a
        # run of plain iterations over the same batch costs one list comparison per iteration
        self._batch_cache: Optional[tuple[list, list[float]]] = None
        self._srv_table: Optional[list[float]] = None

    def reset(self) -> None:
        """Forget every record: the drafter changed (RTN → AWQ, re-quantized after a policy
        update), so what the old one achieved no longer predicts the new one."""
        self._srv = _Counts(self.gamma_max)
        self._recent.clear()
        self._req.clear()
        self._srv_alphas = self._srv_table = self._batch_cache = None

    def _check(self, gamma: int, a: int) -> tuple[int, int]:
        gamma, a = int(gamma), int(a)
        if not 1 <= gamma <= self.gamma_max:
            raise ValueError(f"γ = {gamma} is outside 1..{self.gamma_max}")
        if not 0 <= a <= gamma:
            raise ValueError(f"accept_len {a} is outside 0..γ = 0..{gamma}")
        return gamma, a

    def observe(self, gamma: int, accept_lens, rids: Optional[Sequence[Any]] = None) -> None:
        """Record one speculative iteration: accept_lens [B] = accepted drafts per request (0..γ).
        With ``rids`` [B], also record per request. O(B·γ)."""
        lens = accept_lens.tolist() if hasattr(accept_lens, "tolist") else list(accept_lens)
        if rids is not None and len(rids) != len(lens):
            raise ValueError(f"{len(rids)} rids for {len(lens)} accept lengths")
        gamma = int(gamma)
        for a, m in Counter(lens).items():  # O(distinct lengths ≤ γ+1) server-wide updates
            gamma, a = self._check(gamma, a)
            self._srv.add(a, gamma, m)
            self._recent.append([gamma, a, m])
        over = self._srv.n - self.window
        while over > 0:  # forget the oldest records beyond the window
            old = self._recent[0]
            drop = min(old[2], over)
            self._srv.add(old[1], old[0], -drop)
            over -= drop
            old[2] -= drop
            if not old[2]:
                self._recent.popleft()
        if rids is not None:
            for rid, a in zip(rids, lens):
                self._add_request(rid, gamma, a)
        self._srv_alphas = self._srv_table = self._batch_cache = None

    def observe_request(self, rid: Any, gamma: int, accept_len: int) -> None:
        """Record one request's outcome (per-request history only; see :meth:`observe`)."""
        self._add_request(rid, *self._check(gamma, accept_len))

    def _add_request(self, rid: Any, gamma: int, a: int) -> None:
        self._batch_cache = None
        c = self._req.get(rid)
        if c is None:
            c = self._req[rid] = _Counts(self.gamma_max)
            if len(self._req) > self.max_requests:
                self._req.popitem(last=False)
        else:
            self._req.move_to_end(rid)
        c.add(a, gamma)

    def forget(self, rid: Any) -> None:
        """Drop a finished request's history."""
        if self._req.pop(rid, None) is not None:
            self._batch_cache = None

    @property
    def num_observations(self) -> int:
        """Records in the server-wide window."""
        return self._srv.n

    def alphas(self, rid: Any = None) -> list[float]:
        """α_k, k = 1..γmax: P(draft k accepted | drafts 1..k-1 accepted)."""
        if self._srv_alphas is None:
            c, w = self._srv, self.prior_weight
            pooled = (sum(c.acc) + w * self.prior_alpha) / (sum(c.tried) + w)
            self._srv_alphas = [(c.acc[k] + w * pooled) / (c.tried[k] + w) for k in range(self.gamma_max)]
        srv = self._srv_alphas
        if rid is None:
            return list(srv)
        c = self._req.get(rid)
        if c is None or c.n < self.request_min_obs:
            return list(srv)
        w = self.request_weight
        return [(c.acc[k] + w * srv[k]) / (c.tried[k] + w) for k in range(self.gamma_max)]

    def expected_tokens_table(self, rid: Any = None) -> list[float]:
        """[E[L|γ] for γ = 0..γmax]: tokens a request commits per iteration (γ = 0: 1)."""
        if rid is None and self._srv_table is not None:
            return list(self._srv_table)
        table = expected_lengths(self.alphas(rid))
        if rid is None:
            self._srv_table = table
        return list(table)

    def vouched_expected_tokens_table(self) -> list[float]:
        """[E[L|γ] for γ = 0..γmax] from what the server-wide records alone vouch for: α_k =
        acc_k / (tried_k + w), shrunk towards 0 rather than the prior, so a cold or thinly
        measured position adds next to nothing. For a choice nothing else would correct: a
        verify-only iteration of history drafts is measured only if it runs, and one trusted
        on a 0.5 prior ran at acceptance 0.1-0.4 and cost hybrid 14% of a 64-request rollout."""
        c, w = self._srv, self.prior_weight
        return expected_lengths(c.acc[k] / (c.tried[k] + w) for k in range(self.gamma_max))

    def expected_tokens(self, gamma: int, rid: Any = None) -> float:
        """E[L|γ] = 1 + Σ_{k=1..γ} Π_{j=1..k} α_j; for constant α, (1 − α^(γ+1)) / (1 − α)."""
        if not 0 <= int(gamma) <= self.gamma_max:
            raise ValueError(f"γ = {gamma} is outside 0..{self.gamma_max}")
        return self.expected_tokens_table(rid)[int(gamma)]

    def batch_expected_tokens(self, batch: int, rids: Optional[Sequence[Any]] = None) -> list[float]:
        """[Σ_b E[L_b|γ] for γ = 0..γmax] over a batch; O(B·γmax) with rids, O(γmax) without."""
        srv = self.expected_tokens_table()
        if rids is None:
            return [batch * e for e in srv]
        if len(rids) != batch:
            raise ValueError(f"{len(rids)} rids for a batch of {batch}")
        cached = self._batch_cache
        if cached is not None and cached[0] == rids:
            return list(cached[1])
        # Σ_b of expected_tokens_table(rid_b), inlined: this runs every decode iteration
        total = [0.0] * (self.gamma_max + 1)
        n_srv = 0
        alphas, w, min_obs, req = self.alphas(), self.request_weight, self.request_min_obs, self._req
        ks = range(self.gamma_max)
        for rid in rids:
            c = req.get(rid)
            if c is None or c.n < min_obs:
                n_srv += 1
                continue
            acc, tried = c.acc, c.tried
            run = e = 1.0
            total[0] += 1.0
            for k in ks:
                run *= (acc[k] + w * alphas[k]) / (tried[k] + w)
                e += run
                total[k + 1] += e
        out = [t + n_srv * e for t, e in zip(total, srv)]
        self._batch_cache = (list(rids), out)
        return list(out)


# ====================================================================== policy
RETIME_ITERATIONS = 2048
# Whatever it predicts, the policy speculates once after this many explore_every periods of
# plain iterations (256 by default: at most 0.4% of iterations at a predicted loss), so an
# estimate that a bad measurement pushed below the exploration floor is measured again.
FORCED_EXPLORE_PERIODS = 8
# An exploration of speculation runs this many iterations in a row: the first speculative
# iteration after plain ones finds the drafter's weights out of cache and is not timed (see
# Controller.observe); on gsm8k-lm its draft step took 1.5-2.5x a warm one at B = 8-32, and
# single explorations taught the cost model that speculation loses there (it ran 1.1-1.4x).
EXPLORE_RUN = 2
@dataclass(frozen=True)
class Decision:
    """γ for this iteration and why. Per candidate γ (0 = plain): predicted tokens/s of the
    batch, predicted iteration seconds, expected tokens committed (Σ_b E[L_b|γ])."""

    gamma: int
    predicted_tokens_per_s: dict[int, float]
    reason: str
    predicted_iter_s: dict[int, float] = field(default_factory=dict)
    expected_tokens: dict[int, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Predicted tokens/s at the chosen γ over plain decoding (nan without predictions)."""
        tps = self.predicted_tokens_per_s
        if self.gamma in tps and tps.get(0):
            return tps[self.gamma] / tps[0]
        return float("nan")

    @property
    def best_spec_speedup(self) -> float:
        """The best speculative γ's predicted tokens/s over plain (on a plain iteration: by how
        much speculation was predicted to lose; nan without predictions)."""
        tps = self.predicted_tokens_per_s
        spec = [v for g, v in tps.items() if g]
        return max(spec) / tps[0] if spec and tps.get(0) else float("nan")


class Policy:
    """γ* = argmax over {0} ∪ ladder of predicted tokens/s, O(|ladder|·γmax + B) per call.

    tokens/s(γ) = Σ_b E[L_b|γ] / (Σ_{j<γ} T_D(j) + T_V(γ)); tokens/s(0) = B / T_T.
    Ties go to the smaller γ. Speculation must beat plain by ``min_gain`` (1.0: any gain). A
    change from the previous choice must gain more than ``hysteresis`` (relative), so γ does
    not flap between two nearly equal options as lengths creep up. The decision is a pure
    function of (inputs, previous γ, the models' state); :meth:`evaluate` ignores the
    previous γ. ``fixed_gamma``: always that γ (predictions still reported when a cost model
    and acceptance model are given).
    """

    def __init__(self, cost_model: Optional[CostModel], acceptance: Optional[AcceptanceModel],
                 ladder: Optional[Iterable[int]] = None, min_gain: float = 1.0, hysteresis: float = 0.02,
                 fixed_gamma: Optional[int] = None, explore_every: int = 32, explore_floor: float = 0.7):
        self.cost_model = cost_model
        self.acceptance = acceptance
        gmax = acceptance.gamma_max if acceptance is not None else None
        if ladder is None:
            if gmax is None:
                ladder = [] if fixed_gamma is None else ([fixed_gamma] if fixed_gamma else [])
            else:
                ladder = range(1, gmax + 1)
        lad = sorted({int(g) for g in ladder} - {0})
        if any(g < 0 for g in lad):
            raise ValueError(f"ladder entries must be >= 0, got {sorted(ladder)}")
        if gmax is not None and lad and lad[-1] > gmax:
            raise ValueError(f"ladder {lad} exceeds the acceptance model's γmax = {gmax}")
        if fixed_gamma is None and (cost_model is None or acceptance is None):
            raise ValueError("an adaptive policy needs a cost model and an acceptance model")
        if fixed_gamma is not None:
            fixed_gamma = int(fixed_gamma)
            if fixed_gamma < 0 or (gmax is not None and fixed_gamma > gmax):
                raise ValueError(f"fixed γ = {fixed_gamma} is outside 0..{gmax}")
        if min_gain <= 0 or hysteresis < 0:
            raise ValueError("min_gain must be > 0 and hysteresis >= 0")
        self.ladder = lad
        self.min_gain = float(min_gain)
        self.hysteresis = float(hysteresis)
        self.fixed_gamma = fixed_gamma
        if explore_every < 0 or not 0.0 <= explore_floor <= 1.0:
            raise ValueError("explore_every must be >= 0 and explore_floor in [0, 1]")
        self.explore_every = int(explore_every)
        self.explore_floor = float(explore_floor)
        self.last_gamma: Optional[int] = None
        self._plain_streak = self._spec_streak = 0
        self._iteration = 0
        self._explore_run, self._explore_gamma = 0, 0  # iterations left of a speculative exploration
        self._plain_timed: dict[int, int] = {}  # batch-size octave -> iteration plain last ran
        self._spec_timed: dict[int, int] = {}  # batch-size octave -> iteration speculation last ran

    @classmethod
    def fixed(cls, gamma: int, cost_model: Optional[CostModel] = None,
              acceptance: Optional[AcceptanceModel] = None) -> "Policy":
        """A policy that always returns ``gamma`` (baselines, A/B runs, γ = 0: speculation off)."""
        ladder = [gamma] if gamma and acceptance is None else None
        return cls(cost_model, acceptance, ladder=ladder, fixed_gamma=gamma)

    def reset(self) -> None:
        self.last_gamma = None

    # ------------------------------------------------------------------ evaluation
    def _predict(self, st: BatchStats, rids) -> tuple[dict, dict, dict]:
        cm, acc = self.cost_model, self.acceptance
        exp = acc.batch_expected_tokens(st.batch, rids)
        cands = [0, *self.ladder]
        if self.fixed_gamma is not None and self.fixed_gamma not in cands:
            cands.append(self.fixed_gamma)
        secs = cm.iteration_times(st, cands)
        toks = {g: exp[g] for g in cands}
        tps = {g: exp[g] / secs[g] for g in cands}
        return tps, secs, toks

    def evaluate(self, seq_lens, prefix_groups: PrefixGroups = None, rids: Optional[Sequence[Any]] = None) -> Decision:
        """The best γ for this batch, ignoring the previous choice (no hysteresis, no state)."""
        return self._decide(seq_lens, prefix_groups, rids, prev=None)

    def choose(self, seq_lens, prefix_groups: PrefixGroups = None, rids: Optional[Sequence[Any]] = None) -> Decision:
        """γ for this iteration (with hysteresis against the previous choice, which it updates).

        seq_lens [B]: committed length of each request; prefix_groups: radix-shared prefixes
        (shared_prefix_len, member indices); rids [B]: request ids for per-request acceptance.
        ``seq_lens`` may be a :class:`BatchStats` already summarised (then no ``prefix_groups``).
        """
        st = batch_stats(seq_lens, prefix_groups)
        d = self._decide(st, None, rids, prev=self.last_gamma)
        d = self._explore(d, st.batch)
        self.last_gamma = d.gamma
        self._iteration += 1
        (self._spec_timed if d.gamma else self._plain_timed)[st.batch.bit_length()] = self._iteration
        return d

    def _explore(self, d: Decision, batch: int) -> Decision:
        """What is never chosen is never measured, so a wrong estimate of it would stand for good.

        While γ = 0 is chosen, acceptance is not measured: an estimate that was low once (a cold
        start, the RTN drafter before AWQ, an old policy) would keep speculation off. While
        speculating, the plain step is not timed: a profile that overestimates it (its fixed
        overhead was measured on a deeper model) would keep speculation on. So every
        ``explore_every``-th consecutive iteration of one kind runs the other once -- the best
        γ, or plain -- where that is predicted within ``explore_floor`` of the choice (never in a
        clearly one-sided regime). Besides, plain runs once after 4 speculative iterations in
        every batch-size octave where it has not been timed for ``RETIME_ITERATIONS``:
        as a rollout's batch shrinks, that gives the correction plain times across batch sizes
        (a handful of iterations per rollout). Likewise the best γ runs once after 4 plain
        iterations in every octave where speculation has not run for that long, whatever is
        predicted: a profile whose error grows with the batch (one gsm8k-lm profile predicted
        0.6x at B = 32-64 where speculation measured 1.3x) otherwise keeps a large batch plain,
        because the tail's speculative iterations reset the plain streak the forced exploration
        waits for. Otherwise at most 1/explore_every of the iterations, each losing at most
        1 − floor -- plus, whatever is predicted, one γ iteration after
        ``FORCED_EXPLORE_PERIODS · explore_every`` consecutive plain ones, so that no
        estimate, however it went wrong, keeps speculation off without being measured again."""
        if self.fixed_gamma is not None or not self.explore_every or not self.ladder:
            self._plain_streak = self._spec_streak = 0
            return d
        tps = d.predicted_tokens_per_s
        if self._explore_run:
            self._explore_run -= 1
            if not d.gamma and self._explore_gamma in tps:  # the exploration's timed iteration(s)
                self._spec_streak += 1
                g = self._explore_gamma
                return Decision(g, tps, f"explore γ={g}, continued (the first speculative iteration "
                                f"after plain runs cold and is not timed)", d.predicted_iter_s, d.expected_tokens)
            self._explore_run = 0
        if d.gamma:
            self._plain_streak = 0
            self._spec_streak += 1
            # a batch-size octave where plain was not timed lately: the correction's shape there
            # is a guess (fixed overhead vs per-request slope), so time it once whatever it predicts
            unseen = self._unseen(self._plain_timed, batch)
            if (unseen and self._spec_streak >= min(4, self.explore_every)) or (
                    self._spec_streak >= self.explore_every and tps[0] >= self.explore_floor * tps[d.gamma]):
                self._spec_streak = 0
                return Decision(0, tps, f"explore plain: re-time the plain step at batch {batch} "
                                f"(predicted {tps[0] / tps[d.gamma]:.3f}× γ={d.gamma})",
                                d.predicted_iter_s, d.expected_tokens)
            return d
        self._spec_streak = 0
        self._plain_streak += 1
        best = max(self.ladder, key=lambda g: (tps.get(g, 0.0), -g))
        forced = self._plain_streak >= FORCED_EXPLORE_PERIODS * self.explore_every or (
            self._unseen(self._spec_timed, batch) and self._plain_streak >= min(4, self.explore_every))
        if forced or (self._plain_streak >= self.explore_every and tps.get(best, 0.0) >= self.explore_floor * tps[0]):
            streak, self._plain_streak = self._plain_streak, 0
            self._explore_run, self._explore_gamma = EXPLORE_RUN - 1, best
            return Decision(best, tps, f"explore γ={best}: refresh acceptance after {streak} plain "
                            f"iterations (predicted {tps[best] / tps[0]:.3f}× plain)",
                            d.predicted_iter_s, d.expected_tokens)
        return d

    def _unseen(self, timed: dict, batch: int) -> bool:
        """No iteration of that kind in this batch-size octave for RETIME_ITERATIONS iterations."""
        last = timed.get(batch.bit_length())
        return last is None or self._iteration - last > RETIME_ITERATIONS

    def _decide(self, seq_lens, prefix_groups, rids, prev) -> Decision:
        if self.fixed_gamma is not None and (self.cost_model is None or self.acceptance is None):
            return Decision(self.fixed_gamma, {}, f"fixed γ={self.fixed_gamma}")
        st = batch_stats(seq_lens, prefix_groups)
        if rids is not None and len(rids) != st.batch:
            raise ValueError(f"{len(rids)} rids for a batch of {st.batch}")
        tps, secs, toks = self._predict(st, rids)
        if self.fixed_gamma is not None:
            return Decision(self.fixed_gamma, tps, f"fixed γ={self.fixed_gamma}", secs, toks)
        best = 0
        for g in self.ladder:  # ascending, strict '>': ties keep the smaller γ
            if tps[g] > tps[best]:
                best = g
        plain = tps[0]
        if best and tps[best] < self.min_gain * plain:
            reason = (f"plain: best γ={best} predicts {tps[best] / plain:.3f}× plain, "
                      f"below min_gain {self.min_gain:g}")
            best = 0
        elif best:
            reason = f"γ={best}: {tps[best]:.4g} tok/s vs plain {plain:.4g} (×{tps[best] / plain:.3f})"
        else:
            sb = max(self.ladder, key=lambda g: (tps[g], -g)) if self.ladder else None
            reason = ("plain: no speculative γ in the ladder" if sb is None else
                      f"plain: best γ={sb} predicts only {tps[sb] / plain:.3f}× plain")
        # Stick with the previous γ unless the new best beats it by the hysteresis margin; a
        # previous speculative γ must still clear min_gain within that margin to be kept.
        prev_ok = prev in tps and (prev == 0 or tps[prev] * (1.0 + self.hysteresis) >= self.min_gain * plain)
        if prev is not None and prev != best and prev_ok and tps[best] <= tps[prev] * (1.0 + self.hysteresis):
            reason = (f"kept γ={prev} (hysteresis {self.hysteresis:g}): γ={best} predicts only "
                      f"{tps[best] / tps[prev]:.3f}× it")
            best = prev
        return Decision(best, tps, reason, secs, toks)

    def crossover_batch(self, seq_len: int, max_batch: int = 4096) -> Optional[int]:
        """Smallest batch of ``seq_len``-token requests (no sharing, server-wide acceptance)
        at which the policy stops speculating; None if it still speculates at ``max_batch``.
        (The first such batch: per-sequence overheads and KV-bound verifies can make
        speculation pay again at very large batches, so the set need not be an interval.)"""
        for b in range(1, max_batch + 1):
            if self._decide(BatchStats.uniform(b, seq_len), None, None, prev=None).gamma == 0:
                return b
        return None
