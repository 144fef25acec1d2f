"""Per-request speculative ``meta_info`` that counts γ = 0 iterations as plain decoding.

SGLang's tokenizer computes a request's speculative fields from ``spec_verify_ct`` alone
(proposed drafts = verify_ct × (num_draft_tokens − 1)), which assumes every iteration drafted
the same γ. EFFROLLOUT chooses γ per iteration, 0 included, so the worker tags every token it commits with
``(iteration, γ)`` in the request's ``customized_info`` (SGLang streams that channel sliced by
token offsets, so it must hold one entry per output token, None for the prefill's), and an AFTER hook on the
tokenizer's metric computation turns it back into one γ per iteration -- the request's γ
timeline, returned as ``meta_info["spec_gamma"]`` -- and rewrites SGLang's fields from it:

- ``spec_verify_ct``: iterations that drafted (γ ≥ 1); ``spec_plain_iterations``: those that did not;
- ``spec_num_proposed_drafts``: Σ γ; ``spec_accept_rate`` = correct / proposed;
- ``spec_accept_length``: tokens per drafting iteration, (completion − plain iterations) / verify_ct;
- ``spec_correct_drafts_histogram``: γ = 0 iterations removed from bucket 0.

Where the iteration mixed sources (history drafts) the tag also names the request's
source, and ``meta_info["spec_sources"]`` splits the request's drafts by it:
``{source: {"iterations", "proposed", "accepted"}}`` with source ∈ w4 | group | prompt | self | none.
"""

from __future__ import annotations

KEY = "spec_gamma"


SOURCES_KEY = "spec_sources"


def tag(
    reqs, seq_lens: list[int], iteration: int, gamma: int, new_tokens: list[int], sources: list[str] | None = None
) -> None:
    """Record ``(iteration, γ[, source])`` once per token each request commits in this iteration;
    seq_lens [B]: committed tokens with KV before it (the prompt, then outputs up to x0)."""
    for i, (req, n) in enumerate(zip(reqs, new_tokens)):
        if req.customized_info is None:
            req.customized_info = {}
        tags = req.customized_info.setdefault(KEY, [])
        # SGLang streams ``tags[sent:len(output_ids)]``: the list must stay index-aligned with
        # output_ids, so tokens no decode iteration committed (prefill's) hold None. The outputs
        # committed so far end with x0; counted from seq_lens, not output_ids, which lag an
        # iteration under the overlap scheduler (tags past a request's end are never streamed).
        committed = seq_lens[i] - len(req.origin_input_ids) + 1
        del tags[committed:]
        tags.extend([None] * (committed - len(tags)))
        entry = (iteration, gamma) if sources is None else (iteration, gamma, sources[i])
        tags.extend([entry] * n)


def iterations(tagged) -> list[tuple[int, str, int]]:
    """``[(iteration, γ[, source])]`` per token -> ``(γ, source, tokens committed)`` per iteration."""
    out, last = [], None
    for entry in tagged:
        if entry is None:
            continue
        it, g = entry[0], entry[1]
        if it != last:
            src = entry[2] if len(entry) > 2 else ("w4" if g else "none")
            out.append([g, src, 0])
            last = it
        out[-1][2] += 1
    return [tuple(x) for x in out]


def by_source(its) -> dict:
    out: dict[str, dict[str, int]] = {}
    for g, src, n in its:
        if g == 0:
            continue
        d = out.setdefault(src, {"iterations": 0, "proposed": 0, "accepted": 0})
        d["iterations"] += 1
        d["proposed"] += g if src != "none" else 0
        d["accepted"] += n - 1
    return out


def correct(meta_info: dict) -> None:
    tagged = meta_info.get(KEY)
    if not tagged:
        return
    if isinstance(tagged[0], (list, tuple)) or tagged[0] is None:
        its = iterations(tagged)
        meta_info[KEY] = [g for g, _, _ in its]
        meta_info[SOURCES_KEY] = by_source(its)
    gammas = meta_info[KEY]
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


def after_metrics(result, _tm, meta_info, *args, **kwargs):
    correct(meta_info)
    return result
