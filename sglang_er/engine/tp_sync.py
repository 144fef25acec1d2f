"""One decision per iteration for every tensor-parallel rank: γ, the random stream, the verdict.

Each TP rank runs its own EFFROLLOUT worker over its shard, and every collective of the draft
and verify forwards needs the same token ids on every rank. The logits agree (the logits
processor and the drafter's head gather them), but three things may not:

- γ: the controller reads measured phase times, which differ per rank;
- the random draws of sampled drafts and of the acceptance test;
- floating-point ties, however unlikely.

So rank 0 decides and broadcasts, once per iteration, γ and a seed for a per-iteration
generator that every rank's drafter and acceptance test draw from (equal streams keep the
chain of sampled drafts identical across ranks, which the drafter's embedding lookups need);
its drafts before the verify and its verdict (accept lengths and committed tokens) after it.
Broadcasting the drafts and the verdict makes the result rank 0's even if the streams ever
diverged: rank 0's drafts were drawn from its own q, which is all rejection sampling needs.
The drafter's own generator leaves torch's global one, which SGLang's own sampler relies on
being equal across ranks, untouched. One rank: nothing is sent and the global stream is used.
"""

from __future__ import annotations

import torch


class RankSync:
    def __init__(self, device: torch.device, seed: int | None):
        from sglang.srt.distributed import get_tp_group

        self.group = get_tp_group()
        self.size = self.group.world_size
        self.generator = None
        if self.size > 1:
            self.generator = torch.Generator(device=device)
            # rank 0's source of per-iteration seeds (the other ranks receive them)
            self._seeds = torch.Generator().manual_seed(seed if seed is not None else 0)

    def iteration(self, gamma: int) -> tuple[int, torch.Generator | None]:
        """Rank 0's γ for this iteration and the generator its draws come from (None: one rank)."""
        if self.size == 1:
            return gamma, None
        t = torch.tensor([gamma, 0], dtype=torch.int64)  # [γ, seed]
        if self.group.rank_in_group == 0:
            t[1] = torch.randint(0, 2**62, (1,), generator=self._seeds)
        torch.distributed.broadcast(t, src=self.group.ranks[0], group=self.group.cpu_group)
        self.generator.manual_seed(int(t[1]))
        return int(t[0]), self.generator

    def rank0(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as rank 0 holds it, in place on every rank (on the device group: no host copy)."""
        if self.size > 1:
            self.group.broadcast(t, src=0)
        return t
