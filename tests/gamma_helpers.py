"""Shared by the engine-free γ-choice tests: a Qwen2.5-0.5B-shaped config and small chooser helpers."""

from __future__ import annotations

from sglang_er.gamma import (
    AcceptanceModel,
    BatchStats,
    CostModel,
    GammaChooser,
    ModelCost,
    batch_stats,
)
from sglang_er.gamma.builtin_profiles import builtin_profile
from sglang_er.models.realmodel import QWEN25

# Qwen2.5-0.5B's shapes as the registry model declares them, with a tied head (the base model's)
QWEN2_05B = {
    **QWEN25.shapes,
    "architectures": [QWEN25.architecture],
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def chooser_for(profile: str, model: ModelCost, alpha: float = 0.8, gamma_max: int = 4, **kw) -> GammaChooser:
    cm = CostModel(builtin_profile(profile), model)
    return GammaChooser(cm, AcceptanceModel(gamma_max, prior_alpha=alpha), **kw)


def fresh_choice(chooser: GammaChooser, seq_lens, rids=None):
    """The chooser's decision for a batch on its own: no previous γ to keep (``reset``, as after a
    drafter change); ``chooser`` has ``explore_every=0``, so nothing else carries over either."""
    assert chooser.explore_every == 0
    chooser.reset()
    return chooser.choose(seq_lens, rids)


def crossover(chooser: GammaChooser, seq_len: int, max_batch: int = 4096) -> int | None:
    """Smallest batch of ``seq_len``-token requests at which ``chooser`` (deciding each batch on
    its own) decodes plainly; None if it still speculates at ``max_batch``. (The first such batch:
    per-sequence overheads and KV-bound verifies can make speculation pay again at very large
    batches, so the set need not be an interval.)"""
    batches = range(1, max_batch + 1)
    return next((b for b in batches if fresh_choice(chooser, BatchStats.uniform(b, seq_len)).gamma == 0), None)


def shared_batch(lens: list[int], prompt_keys: list) -> BatchStats:
    """The batch as the controller summarises it: requests with the same prompt share its KV pages."""
    from sglang_er.gamma.controller import shared_prefix_tokens

    st = batch_stats(lens)
    return BatchStats(st.batch, st.sum_len, st.max_len, shared_prefix_tokens(prompt_keys))


def accepted_run(rng, alphas, gamma):
    """Drafts accepted in one iteration when position k is accepted with probability alphas[k]."""
    a = 0
    while a < gamma and rng.random() < alphas[a]:
        a += 1
    return a
