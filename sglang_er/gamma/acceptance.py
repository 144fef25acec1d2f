"""Per-position acceptance rates of the drafts and the tokens a speculative iteration commits.

A γ-step draft commits E[L|γ] = 1 + Σ_{k=1..γ} Π_{j=1..k} α_j tokens per request (α_j: the chance
the j-th draft is accepted given drafts 1..j-1 were), the numerator of the γ choice. Acceptance
changes with the policy checkpoint and differs between requests, so it is counted over a recent
window, per request once a request has history, shrunk towards a prior while counts are thin.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["AcceptanceModel", "expected_lengths"]


class _Counts:
    __slots__ = ("acc", "n", "tried")

    def __init__(self, g: int) -> None:
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

    def __init__(
        self,
        gamma_max: int,
        window: int = 4096,
        prior_alpha: float = 0.7,
        prior_weight: float = 8.0,
        request_min_obs: int = 8,
        request_weight: float = 8.0,
        max_requests: int = 65536,
    ) -> None:
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
        self._req: OrderedDict[Any, _Counts] = OrderedDict()
        self._srv_alphas: list[float] | None = None
        # the last batch_expected_tokens answer: (rids, answer); any new record clears it, so a
        # run of plain iterations over the same batch costs one list comparison per iteration
        self._batch_cache: tuple[list, list[float]] | None = None
        self._srv_table: list[float] | None = None

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

    def observe(self, gamma: int, accept_lens: Sequence[int] | Any, rids: Sequence[Any] | None = None) -> None:
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
        verify-only iteration of history drafts is measured only if it runs (trusting the 0.5
        prior cost a 64-request rollout 14%)."""
        c, w = self._srv, self.prior_weight
        return expected_lengths(c.acc[k] / (c.tried[k] + w) for k in range(self.gamma_max))

    def batch_expected_tokens(self, batch: int, rids: Sequence[Any] | None = None) -> list[float]:
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
