"""Drafting under a grammar: constrained requests (regex, JSON schema, EBNF, structural tags)
speculate, losslessly.

Plain SGLang draws a constrained token from the target's logits masked by what the grammar
allows after the text so far. A draft chain x0, d1..dγ needs the masks after x0, after d1, ...,
after dγ: :class:`GrammarChain` advances each request's matcher over its drafts as they are
drawn (the drafter samples under the same masks, so its drafts are legal and the forced
structure tokens are the ones it proposes), keeps the γ + 1 masks for the verify, and rolls the
matcher back. The scheduler then advances it over the committed run, as it does for SGLang's own
speculative workers, and drops what follows the grammar's end.

A draft the matcher refuses (a token id beyond the tokenizer, say) stops that row's chain: its
target probability under the mask before it is zero, so it is rejected there and the masks after
it are never read.
"""

from __future__ import annotations

import torch


class GrammarChain:
    """The grammar masks of one speculative iteration: position j (0..γ) masks the logits that
    predict token j + 1 of the chain [x0, d1..dγ], for the rows that carry a grammar (others
    stay all-allowed)."""

    def __init__(self, reqs, gamma: int, vocab: int, device: torch.device):
        self.rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        self.grammars = [reqs[i].grammar for i in self.rows]
        self.width = gamma + 1
        self.device = device
        g = self.grammars[0]
        # [B * (γ+1), W] bitmask in the grammar backend's own format, all allowed
        self.masks = g.allocate_vocab_mask(vocab_size=vocab, batch_size=len(reqs) * self.width, device="cpu")
        self.advanced = [0] * len(self.rows)  # tokens each matcher accepted this iteration
        self.live = [not g.is_terminated() for g in self.grammars]
        for k, i in enumerate(self.rows):
            if self.live[k]:
                # after x0, which the scheduler's matcher accepted last iteration
                self.grammars[k].fill_vocab_mask(self.masks, i * self.width)

    @classmethod
    def of(cls, reqs, gamma: int, vocab: int, device: torch.device) -> GrammarChain | None:
        """The chain for a batch, or None when no request carries a grammar."""
        if not any(r.grammar is not None for r in reqs):
            return None
        return cls(reqs, gamma, vocab, device)

    def _apply(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        self.grammars[0].apply_vocab_mask(logits, self.grammars[0].move_vocab_mask(mask, self.device))

    def mask(self, j: int, logits: torch.Tensor) -> None:
        """Mask in place the drafter's logits [B, V] of step j (they predict d_{j+1}). A row whose
        draft head scores none of the allowed tokens (a draft vocabulary without the end token,
        say) proposes uniformly over them: any q the draft is drawn from keeps the test exact."""
        mask = self.masks.view(-1, self.width, self.masks.shape[-1])[:, j].contiguous()  # [B, W]
        self._apply(logits, mask)
        dead = torch.isneginf(logits).all(-1)  # [B]
        if dead.any():
            logits[dead] = 0.0
            self._apply(logits, mask)

    def advance(self, j: int, tokens: torch.Tensor) -> None:
        """Advance the matchers over the drafts d_{j+1} [B] and fill the masks of position j + 1."""
        drawn = tokens.tolist()
        for k, i in enumerate(self.rows):
            g = self.grammars[k]
            if not self.live[k] or g.is_terminated():
                self.live[k] = False
                continue
            try:
                g.accept_token(drawn[i])
            except ValueError:  # refused: rejected at position j by the target's mask
                self.live[k] = False
                continue
            self.advanced[k] += 1
            if not g.is_terminated():
                g.fill_vocab_mask(self.masks, i * self.width + j + 1)

    def rollback(self) -> None:
        """Return every matcher to where the iteration found it."""
        for k, g in enumerate(self.grammars):
            if self.advanced[k]:
                g.rollback(self.advanced[k])
            self.advanced[k] = 0

    def mask_verify(self, logits: torch.Tensor) -> None:
        """Mask in place the target's verify logits [B, γ+1, V] with the chain's masks."""
        flat = logits.view(-1, logits.shape[-1])
        self._apply(flat, self.masks)
