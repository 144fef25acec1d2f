"""Lossless sampling maths for W4 self-speculative decoding.

Engine-free (plain torch, CPU or CUDA). Three jobs:

1. ``target_probs`` reproduces, as an explicit probability tensor, the exact
   distribution SGLang 0.5.23's sampler draws the next token from
   (``sglang/srt/layers/sampler.py``, ``pytorch`` sampling backend):

       all-greedy batch (every row top_k <= 1):  token = argmax(logits)
       otherwise:
           probs = softmax(logits / temperature)          # float32
           if any row needs top-k / top-p / min-p:        # batch-level flags!
               sort probs descending (torch.topk when max_top_k is known)
               csum = cumsum(sorted)                     # of the UNMASKED sort
               sorted[rank >= top_k] = 0
               sorted[csum - sorted > top_p] = 0          # exclusive cumsum > p
               if any row min_p > 0:
                   sorted[sorted < sorted[0] * min_p] = 0
           token ~ multinomial(sorted)                    # implicit renorm

   Greedy requests are represented by SGLang as ``temperature=1, top_k=1``
   (``SamplingParams.normalize`` turns temperature < 1e-6 into that);
   ``top_k = 1 << 30`` (TOP_K_ALL) means "off", ``top_p = 1.0`` and
   ``min_p = 0.0`` are off.

2. ``sample`` draws from such a distribution (inverse CDF: one uniform per
   row against the running sum; exact for one-hot rows).

3. ``verify`` is standard lossless speculative sampling (Leviathan et al. /
   Chen et al.) over a chain of gamma drafts, vectorised over the batch.

Anything SGLang applies *before* the sampler (penalties, logit_bias, grammar
masks, custom logit processors, NaN sanitising) must already be in the
logits handed to ``target_probs``; the draft side must draw its tokens from
exactly the ``draft_probs`` it hands to ``verify``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

# Mirrors of sglang.srt.sampling.sampling_params constants (checked by tests;
# importing that module costs seconds, so they are not imported here).
TOP_K_ALL = 1 << 30
SAMPLING_EPS = 1e-6

__all__ = [
    "TOP_K_ALL",
    "SAMPLING_EPS",
    "SamplingParamsTensor",
    "target_probs",
    "sample",
    "verify",
    "verify_greedy",
]


@dataclasses.dataclass
class SamplingParamsTensor:
    """Per-request sampling parameters as tensors, SGLang-normalised.

    temperature: [B] float32 (greedy rows hold 1.0, as in SGLang)
    top_p:       [B] float32 (1.0 = off)
    top_k:       [B] int64   (TOP_K_ALL = off, 1 = greedy)
    min_p:       [B] float32 (0.0 = off)

    The flags are *batch-level*, exactly like ``SamplingBatchInfo``: SGLang
    only runs the sort/mask path when some row needs it, and that choice
    changes float rounding for the other rows (a row with top_p=1.0 can lose
    its tail when the exclusive cumsum rounds above 1.0), so we mirror it.
    ``max_top_k`` is set only when SGLang would take its ``torch.topk``
    shortcut (every row has a finite top_k, no seed, no sampling-mask capture).
    ``backend`` is SGLang's ``--sampling-backend`` ("pytorch" reproduced
    exactly; "flashinfer" reproduced up to the kernels' tie/boundary handling).
    """

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    is_all_greedy: bool
    need_top_p_sampling: bool
    need_top_k_sampling: bool
    need_min_p_sampling: bool
    max_top_k: int | None = None
    backend: str = "pytorch"

    def __len__(self) -> int:
        return int(self.temperature.shape[0])

    @property
    def is_greedy(self) -> torch.Tensor:
        """[B] bool: rows SGLang treats as greedy (top_k <= 1)."""
        return self.top_k <= 1

    def to(self, device) -> SamplingParamsTensor:
        return dataclasses.replace(
            self,
            temperature=self.temperature.to(device),
            top_p=self.top_p.to(device),
            top_k=self.top_k.to(device),
            min_p=self.min_p.to(device),
        )

    @classmethod
    def from_lists(
        cls,
        temperature: Sequence[float],
        top_p: Sequence[float] | None = None,
        top_k: Sequence[int] | None = None,
        min_p: Sequence[float] | None = None,
        device: str | torch.device | None = None,
        backend: str = "pytorch",
    ) -> SamplingParamsTensor:
        """Build from user-facing values, normalised like
        ``SamplingParams.normalize`` + ``SamplingBatchInfo.from_schedule_batch``:
        temperature in [0, 1e-6) -> (temperature 1.0, top_k 1); top_k -1 ->
        TOP_K_ALL; None -> defaults (1.0 / 1.0 / -1 / 0.0)."""
        n = len(temperature)
        top_p = [1.0] * n if top_p is None else list(top_p)
        top_k = [-1] * n if top_k is None else list(top_k)
        min_p = [0.0] * n if min_p is None else list(min_p)
        assert len(top_p) == len(top_k) == len(min_p) == n
        temps, ks = [], []
        for t, k in zip(temperature, top_k):
            t = 1.0 if t is None else float(t)
            k = -1 if k is None else int(k)
            if 0 <= t < SAMPLING_EPS:
                t, k = 1.0, 1
            if k == -1:
                k = TOP_K_ALL
            temps.append(t)
            ks.append(k)
        ps = [1.0 if p is None else float(p) for p in top_p]
        mps = [0.0 if m is None else float(m) for m in min_p]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_p=torch.tensor(ps, dtype=torch.float32, device=device),
            top_k=torch.tensor(ks, dtype=torch.int64, device=device),
            min_p=torch.tensor(mps, dtype=torch.float32, device=device),
            is_all_greedy=all(k <= 1 for k in ks),
            need_top_p_sampling=any(p != 1.0 for p in ps),
            need_top_k_sampling=any(k != TOP_K_ALL for k in ks),
            need_min_p_sampling=any(m > 0 for m in mps),
            max_top_k=(max(ks) if ks and all(1 <= k < TOP_K_ALL for k in ks) else None),
            backend=backend,
        )

    @classmethod
    def from_sampling_info(cls, sampling_info, backend: str | None = None) -> SamplingParamsTensor:
        """Read SGLang's ``SamplingBatchInfo`` (already normalised by SGLang).

        ``backend=None`` asks the running SGLang for ``--sampling-backend``
        and falls back to "pytorch" outside a server.
        """
        if backend is None:
            from sglang_er.engine.kernels import sampling_backend

            backend = sampling_backend()
        # SGLang skips its topk shortcut when seeded or capturing masks.
        use_topk = (
            getattr(sampling_info, "sampling_seed", None) is None
            and getattr(sampling_info, "sampling_mask_batch_indices", None) is None
        )
        max_top_k = getattr(sampling_info, "max_top_k", None) if use_topk else None
        return cls(
            temperature=sampling_info.temperatures.reshape(-1).float(),
            top_p=sampling_info.top_ps.reshape(-1).float(),
            top_k=sampling_info.top_ks.reshape(-1).long(),
            min_p=sampling_info.min_ps.reshape(-1).float(),
            is_all_greedy=bool(sampling_info.is_all_greedy),
            need_top_p_sampling=bool(sampling_info.need_top_p_sampling),
            need_top_k_sampling=bool(sampling_info.need_top_k_sampling),
            need_min_p_sampling=bool(sampling_info.need_min_p_sampling),
            max_top_k=max_top_k,
            backend=backend,
        )


def _one_hot(idx: torch.Tensor, vocab: int) -> torch.Tensor:
    """idx [N] -> float32 one-hot [N, V]."""
    out = torch.zeros(idx.shape[0], vocab, dtype=torch.float32, device=idx.device)
    return out.scatter_(1, idx.view(-1, 1), 1.0)


def _filter_pytorch(
    probs: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    need_min_p: bool,
    max_top_k: int | None,
) -> torch.Tensor:
    """Same ops, same order as ``top_k_top_p_min_p_sampling_from_probs_torch``.

    probs [N, V] float32 (rows sum to 1); per-row params [N]. Returns the
    renormalised kept mass scattered back to vocabulary order, [N, V].
    """
    vocab = probs.shape[-1]
    if max_top_k is not None and max_top_k < vocab:
        probs_sort, probs_idx = torch.topk(probs, k=max_top_k, dim=-1, sorted=True)
    else:
        probs_sort, probs_idx = probs.sort(dim=-1, descending=True)
    # cumsum before masking: top-p is judged on the *original* mass (joint
    # top-k/top-p, not "top-p of the top-k-renormalised distribution").
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    ranks = torch.arange(probs_sort.shape[-1], device=probs.device).view(1, -1)
    probs_sort[ranks >= top_ks.view(-1, 1)] = 0.0
    probs_sort[(probs_sum - probs_sort) > top_ps.view(-1, 1)] = 0.0
    if need_min_p:
        # Rank 0 always survives (k >= 1, exclusive cumsum 0), so this is the
        # row max.
        thresholds = probs_sort[:, 0] * min_ps
        probs_sort[probs_sort < thresholds.view(-1, 1)] = 0.0
    # SGLang hands the unnormalised weights to torch.multinomial; normalising
    # gives the distribution it samples from.
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort)


def _top_k_renorm(probs: torch.Tensor, top_ks: torch.Tensor) -> torch.Tensor:
    probs_sort, probs_idx = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
    probs_sort = probs_sort.masked_fill(ranks >= top_ks.view(-1, 1), 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort)


def _top_p_renorm(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    probs_sort, probs_idx = probs.sort(dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort = probs_sort.masked_fill((probs_sum - probs_sort) > top_ps.view(-1, 1), 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort)


def _filter_flashinfer(
    probs: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    need_min_p: bool,
) -> torch.Tensor:
    """SGLang's flashinfer path, in torch. Without min-p it calls the *joint*
    top-k/top-p kernel (same set as the pytorch path). With min-p it runs
    top_k_renorm -> top_p_renorm (top-p of the renormalised top-k!) ->
    min-p against the renormalised max: a different set."""
    if not need_min_p:
        return _filter_pytorch(probs, top_ks, top_ps, min_ps, False, None)
    probs = _top_k_renorm(probs, top_ks)
    probs = _top_p_renorm(probs, top_ps)
    thresholds = probs.max(dim=-1).values * min_ps
    probs = probs.masked_fill(probs < thresholds.view(-1, 1), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def target_probs(logits: torch.Tensor, params: SamplingParamsTensor) -> torch.Tensor:
    """The exact distribution SGLang's sampler draws from.

    logits: [B, V] or [B, T, V] (any float dtype; SGLang's are float32).
            Request b's params apply to all T positions of row b.
    Returns float32 probs of the same shape; greedy rows are one-hot.
    Does not modify ``logits``.
    """
    squeeze = logits.dim() == 2
    if squeeze:
        logits = logits.unsqueeze(1)
    assert logits.dim() == 3, f"expected [B, V] or [B, T, V], got {logits.shape}"
    bsz, steps, vocab = logits.shape
    assert len(params) == bsz, f"{len(params)} params rows for batch {bsz}"
    p = params.to(logits.device)
    x = logits.reshape(bsz * steps, vocab).float()

    def rows(t: torch.Tensor) -> torch.Tensor:
        # [B] -> [B*T], request-major like the flattened logits.
        return t.repeat_interleave(steps)

    if p.is_all_greedy:
        # SGLang: torch.argmax(logits, -1) on float32 logits (first maximum).
        out = _one_hot(torch.argmax(x, dim=-1), vocab)
    else:
        # Greedy rows here hold temperature 1 / top_k 1: the top-k mask below
        # turns them into a one-hot at SGLang's sort winner.
        x = x / rows(p.temperature).view(-1, 1)
        out = torch.softmax(x, dim=-1)
        if p.need_top_k_sampling or p.need_top_p_sampling or p.need_min_p_sampling:
            args = (rows(p.top_k), rows(p.top_p), rows(p.min_p), p.need_min_p_sampling)
            if p.backend == "flashinfer":
                out = _filter_flashinfer(out, *args)
            else:
                out = _filter_pytorch(out, *args, p.max_top_k)
    out = out.view(bsz, steps, vocab)
    return out.squeeze(1) if squeeze else out


def _inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Index ~ weights / weights.sum() along the last dim, [..., V] -> [...] int64.

    One uniform per row against the running sum, where an exponential (Gumbel-max) race needs
    V random draws per row: on CPU ``exponential_`` costs ~20 ns an entry, 2.5 ms per draft
    step at 32 x 4096, against 0.09 ms for this. No normalisation needed. A zero-weight entry
    never wins: its running sum equals its predecessor's, so it is never the first index whose
    sum exceeds u. ``u * total`` may round up to ``total``; clamping to the last positive entry
    (the first index of the running sum's maximum) absorbs that. One-hot rows are exact.
    """
    cdf = weights.float().cumsum(-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, dtype=torch.float32, device=cdf.device, generator=generator) * total
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return torch.minimum(idx, cdf.argmax(dim=-1))


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs [B, V] (or [..., V]) -> tokens [B] (or [...]) int64."""
    return _inverse_cdf(probs, generator)


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling over a chain of gamma drafts.

    draft_tokens [B, G] int64: x_k ~ q_k, G = gamma >= 0.
    draft_probs  [B, G, V]:    q_k, exactly what x_k was drawn from.
    target_probs [B, G+1, V]:  p_k (e.g. ``target_probs(target_logits, params)``).
    Returns (accept_len [B] int64, out_tokens [B, G+1] int64) with
    out_tokens[b, :a] = accepted drafts, out_tokens[b, a] = correction/bonus
    token, -1 afterwards (a = accept_len[b]).

    x_k is accepted with prob min(1, p_k(x_k)/q_k(x_k)); at the first
    rejection the token is drawn from norm(max(p_k - q_k, 0)); after G
    acceptances a bonus is drawn from p_G. Every emitted token is then
    distributed exactly as sampling from p directly. With one-hot p and q this
    is argmax matching (no randomness affects the result).
    """
    bsz, gamma = draft_tokens.shape
    vocab = target_probs.shape[-1]
    device = target_probs.device
    assert target_probs.shape == (bsz, gamma + 1, vocab), target_probs.shape
    assert draft_probs.shape == (bsz, gamma, vocab), draft_probs.shape
    p_all = target_probs.float()
    q_all = draft_probs.float()
    tok = draft_tokens.long()

    if gamma > 0:
        p_x = p_all[:, :gamma].gather(-1, tok.unsqueeze(-1)).squeeze(-1)  # [B, G]
        q_x = q_all.gather(-1, tok.unsqueeze(-1)).squeeze(-1)  # [B, G]
        u = torch.rand((bsz, gamma), dtype=torch.float32, device=device, generator=generator)
        # u < p/q  <=>  u*q < p: no division, P(accept) = min(1, p/q) for
        # u ~ U[0,1); one-hot p,q give accept iff p_x == 1 for every u.
        accepted = u * q_x < p_x
        # Length of the all-accepted prefix: cumprod stops at first rejection.
        accept_len = accepted.long().cumprod(dim=-1).sum(dim=-1)
    else:
        accept_len = torch.zeros(bsz, dtype=torch.long, device=device)

    # Only the row at position accept_len matters: gather it instead of
    # building [B, G, V] residuals.
    batch = torch.arange(bsz, device=device)
    p_sel = p_all[batch, accept_len]  # [B, V]
    if gamma > 0:
        # q at the rejection slot; the bonus slot (accept_len == G) has no
        # draft, so its q is zero and the residual is p itself.
        q_sel = q_all[batch, accept_len.clamp(max=gamma - 1)]  # [B, V]
        q_sel = q_sel * (accept_len < gamma).view(-1, 1)
        residual = (p_sel - q_sel).clamp_min_(0.0)
    else:
        residual = p_sel
    # max(p-q, 0) can only vanish (up to rounding) where p == q, where a
    # rejection is impossible in exact arithmetic: fall back to p.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p_sel, residual)
    next_tok = _inverse_cdf(residual, generator)  # [B]

    pos = torch.arange(gamma + 1, device=device).view(1, -1)
    drafts_pad = torch.cat([tok, tok.new_full((bsz, 1), -1)], dim=1)
    out = torch.where(pos < accept_len.view(-1, 1), drafts_pad, -1)
    out.scatter_(1, accept_len.view(-1, 1), next_tok.view(-1, 1))
    return accept_len, out


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast path for an all-greedy batch: argmax matching, no softmax.

    draft_tokens [B, G] int64, target_logits [B, G+1, V].
    Same outputs as ``verify``. Uses torch.argmax on float32 logits, as
    SGLang's all-greedy sampler does (first maximum wins ties).
    """
    bsz, gamma = draft_tokens.shape
    target_ids = torch.argmax(target_logits.float(), dim=-1)  # [B, G+1]
    tok = draft_tokens.long()
    match = tok == target_ids[:, :gamma]
    accept_len = match.long().cumprod(dim=-1).sum(dim=-1)
    pos = torch.arange(gamma + 1, device=tok.device).view(1, -1)
    drafts_pad = torch.cat([tok, tok.new_full((bsz, 1), -1)], dim=1)
    out = torch.where(pos < accept_len.view(-1, 1), drafts_pad, -1)
    out.scatter_(1, accept_len.view(-1, 1), target_ids.gather(1, accept_len.view(-1, 1)))
    return accept_len, out
