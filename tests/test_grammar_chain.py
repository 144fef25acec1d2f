"""The grammar masks of a draft chain (:class:`sglang_er.engine.grammar.GrammarChain`) on a small
grammar with SGLang's grammar-object interface and xgrammar's bitmasks: masks follow the drafts,
matchers come back to where they were, a refused draft ends its row's chain, and a draft head that
scores none of the allowed tokens still yields a proper proposal distribution."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import xgrammar as xgr

V = 64
EOS = 63
# token sequence the grammar accepts: 5, then 7 or 9, then EOS
STATES = [{5}, {7, 9}, {EOS}]


class ChainGrammar:
    """The grammar-object calls the chain makes (accept/rollback/fill/apply), over STATES."""

    def __init__(self):
        self.accepted: list[int] = []

    def is_terminated(self) -> bool:
        return len(self.accepted) == len(STATES)

    def accept_token(self, token: int) -> None:
        if self.is_terminated() or token not in STATES[len(self.accepted)]:
            raise ValueError(f"Tokens not accepted: {token}")
        self.accepted.append(token)

    def rollback(self, k: int) -> None:
        assert 0 < k <= len(self.accepted)
        del self.accepted[-k:]

    @staticmethod
    def allocate_vocab_mask(vocab_size: int, batch_size: int, device) -> torch.Tensor:
        return xgr.allocate_token_bitmask(batch_size, vocab_size)

    def fill_vocab_mask(self, vocab_mask: torch.Tensor, idx: int) -> None:
        words = [0] * vocab_mask.shape[1]
        for t in STATES[len(self.accepted)]:
            words[t // 32] |= 1 << (t % 32)
        vocab_mask[idx] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)

    @staticmethod
    def move_vocab_mask(vocab_mask: torch.Tensor, device) -> torch.Tensor:
        return vocab_mask.to(device)

    @staticmethod
    def apply_vocab_mask(logits: torch.Tensor, vocab_mask: torch.Tensor) -> None:
        xgr.apply_token_bitmask_inplace(logits, vocab_mask)


def _chain(gamma: int = 3):
    from sglang_er.engine.grammar import GrammarChain

    reqs = [SimpleNamespace(grammar=ChainGrammar()), SimpleNamespace(grammar=None)]
    return reqs, GrammarChain.of(reqs, gamma, V, torch.device("cpu"))


def _allowed(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(~torch.isneginf(logits)).flatten().tolist())


def test_masks_follow_the_drafts_and_the_matcher_comes_back():
    reqs, chain = _chain()
    g = reqs[0].grammar
    seen = []
    for j, draft in enumerate([5, 9, EOS]):
        logits = torch.zeros(2, V)
        chain.mask(j, logits)
        seen.append(_allowed(logits[0]))
        assert _allowed(logits[1]) == set(range(V))  # the unconstrained row is untouched
        chain.advance(j, torch.tensor([draft, 0]))
    assert seen == STATES and g.accepted == [5, 9, EOS]
    chain.rollback()
    assert g.accepted == []
    verify = torch.zeros(2, 4, V)
    chain.mask_verify(verify)
    assert [_allowed(verify[0, j]) for j in range(3)] == STATES
    assert _allowed(verify[0, 3]) == set(range(V))  # after the end: never read, left open
    assert _allowed(verify[1, 0]) == set(range(V))


def test_a_refused_draft_ends_its_row_chain():
    reqs, chain = _chain()
    chain.advance(0, torch.tensor([6, 0]))  # not allowed: the target's mask rejects it at position 0
    chain.advance(1, torch.tensor([7, 0]))
    chain.rollback()
    assert reqs[0].grammar.accepted == []
    verify = torch.zeros(2, 4, V)
    chain.mask_verify(verify)
    assert _allowed(verify[0, 0]) == STATES[0] and _allowed(verify[0, 1]) == set(range(V))


def test_a_draft_head_without_the_allowed_tokens_proposes_uniformly_over_them():
    reqs, chain = _chain()
    chain.advance(0, torch.tensor([5, 0]))
    logits = torch.full((2, V), float("-inf"))
    logits[:, :4] = 1.0  # a draft vocabulary of tokens 0..3: it scores neither 7 nor 9
    chain.mask(1, logits)
    q = torch.softmax(logits, -1)
    assert not torch.isnan(q).any()
    assert q[0, 7] == q[0, 9] == 0.5
    assert _allowed(logits[1]) == {0, 1, 2, 3}  # the unconstrained row keeps its own scores
