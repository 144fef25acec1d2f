"""eval.history_probe scores history proposals exactly: p_k(h_k | context, h_<k) from the sample's
own KV cache cropped to the step equals a fresh forward over the whole text."""

from __future__ import annotations

import pytest


def test_scorer_matches_a_full_forward(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from eval.history_probe import Scorer, agreed_prefix, expected_accepted

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (40,), generator=g).tolist()
    scorer = Scorer(model, ids)
    prefix, h = 25, [7, 99, 250, 3]  # a proposal that is not the text's continuation
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids[:prefix] + h])).logits[0].float(), -1)
    want = [float(probs[prefix - 1 + k, t]) for k, t in enumerate(h)]
    assert scorer(prefix, h) == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert expected_accepted([0.5, 0.5]) == pytest.approx(0.75)
    assert agreed_prefix([3, 2, 1, 2]) == 2
