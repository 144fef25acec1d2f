"""Per-request speculative ``meta_info`` that counts γ = 0 iterations as plain decoding.

SGLang's tokenizer computes a request's speculative fields from ``spec_verify_ct`` alone
(proposed drafts = verify_ct × (num_draft_tokens − 1)), which assumes every iteration drafted
the same γ. EFFROLLOUT chooses γ per iteration, 0 included, so the worker tags each decode
iteration with its γ through SGLang's ``customized_info`` channel (it arrives in
``meta_info["spec_gamma"]``, one entry per iteration: the request's γ timeline), and an AFTER
hook on the tokenizer's metric computation rewrites SGLang's fields from it:

- ``spec_verify_ct``: iterations that drafted (γ ≥ 1); ``spec_plain_iterations``: those that did not;
- ``spec_num_proposed_drafts``: Σ γ; ``spec_accept_rate`` = correct / proposed;
- ``spec_accept_length``: tokens per drafting iteration, (completion − plain iterations) / verify_ct;
- ``spec_correct_drafts_histogram``: γ = 0 iterations removed from bucket 0.
"""

from __future__ import annotations

KEY = "spec_gamma"
_TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._calculate_spec_decoding_metrics"


def correct(meta_info: dict) -> None:
    gammas = meta_info.get(KEY)
    if not gammas:
        return
    n_plain = sum(1 for g in gammas if g == 0)
    n_spec = len(gammas) - n_plain
    proposed = sum(gammas)
    correct_drafts = meta_info.get("spec_num_correct_drafts", 0)
    meta_info["spec_plain_iterations"] = n_plain
    meta_info["spec_verify_ct"] = n_spec
    meta_info["spec_num_proposed_drafts"] = proposed
    meta_info["spec_num_correct_drafts"] = correct_drafts
    if n_spec:
        meta_info["spec_accept_rate"] = correct_drafts / proposed
        meta_info["spec_accept_length"] = (meta_info["completion_tokens"] - n_plain) / n_spec
    else:
        meta_info.pop("spec_accept_rate", None)
        meta_info.pop("spec_accept_length", None)
    hist = meta_info.get("spec_correct_drafts_histogram")
    if hist:
        hist = list(hist)
        hist[0] = max(0, hist[0] - n_plain)
        meta_info["spec_correct_drafts_histogram"] = hist


def _after(result, _tm, meta_info, *args, **kwargs):
    correct(meta_info)
    return result


def install() -> None:
    from sglang_er._sglang import hook_after

    hook_after(_TARGET, _after)
