"""What a step hands the next one, with and without SGLang's overlap scheduler, where a request's
``output_ids`` lag an iteration when the worker runs (the servers in test_worker.py run both ways)."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import torch

from sglang_er.engine import spec_meta
from sglang_er.engine.batch import committed_outputs
from sglang_er.engine.draft_input import ChainDraftInput


def test_carried_tokens_follow_filter_and_merge():
    a = ChainDraftInput(bonus_tokens=torch.tensor([10, 11, 12]))
    a.filter_batch(torch.tensor([0, 2]), [0, 2])
    a.merge_batch(ChainDraftInput(bonus_tokens=torch.tensor([13])))
    assert a.bonus_tokens.tolist() == [10, 12, 13]


def test_relayed_inputs_track_request_slots_only():
    """Under overlap the tokens live in the FutureMap: a stale ``bonus_tokens`` must not survive a
    filter or a merge (it would be misaligned with the batch)."""
    a = ChainDraftInput(bonus_tokens=torch.tensor([10, 11, 12]), future_indices=torch.tensor([4, 5, 6]))
    a.filter_batch(torch.tensor([0, 2]), [0, 2])
    assert a.future_indices.tolist() == [4, 6] and a.bonus_tokens is None
    a.merge_batch(ChainDraftInput(future_indices=torch.tensor([9])))
    assert a.future_indices.tolist() == [4, 6, 9] and a.bonus_tokens is None


def _req(rid, prompt, outputs):
    return SimpleNamespace(rid=rid, origin_input_ids=array("q", prompt), output_ids=array("q", outputs))


def test_history_context_includes_the_step_not_yet_processed():
    # prompt of 3; outputs 7, 8 processed; the in-flight step committed 9, 5 (x0 = 5): seq_lens 3 + 3
    lag = _req("a", [1, 2, 3], [7, 8])
    synced = _req("b", [1, 2], [4, 6])  # seq_lens 2 + 1: output_ids up to date
    unknown = _req("c", [1], [])  # one output missing, and no record of it
    recent = (["a", "x"], torch.tensor([[9, 5, -1], [3, 3, 3]]), torch.tensor([2, 3]))
    outputs = committed_outputs([6, 3, 1], recent)
    assert list(outputs(0, lag)) == [7, 8, 9, 5]
    assert list(outputs(1, synced)) == [4, 6]
    assert outputs(2, unknown) is None


def test_gamma_tags_are_placed_by_committed_length_not_by_lagging_outputs():
    req = _req("a", [1, 2, 3], [7])  # prefill token 7 processed
    req.customized_info = None
    spec_meta.tag([req], [3], 1, 2, [3])  # iteration 1 (x0 = 7) commits 3 tokens
    # iteration 2 runs before iteration 1 is processed: output_ids still [7]; it must not drop 1's tags
    spec_meta.tag([req], [6], 2, 0, [1])
    assert req.customized_info[spec_meta.KEY] == [None, (1, 2), (1, 2), (1, 2), (2, 0)]
