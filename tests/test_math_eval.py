"""The math eval harness: answer extraction, grading, pass@k / maj@k, datasets, response parsing,
and one end-to-end run against a real tiny SGLang server."""

from __future__ import annotations

import json
import math

import pytest

from eval import grading
from eval.grading import (
    answer_clusters,
    extract_boxed,
    grade,
    is_equiv,
    maj_at_k,
    pass_at_k,
    reference_answer,
)
from eval.math_data import DatasetError, data_root, load_problems
from eval.math_eval import main
from sglang_er.evaluation.client import parse_response
from sglang_er.evaluation.records import INSTRUCTION, EvalConfig, SampleRecord, Summary
from sglang_er.evaluation.stats import acceptance_stats, percentile, score


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, want",
    [
        (r"The answer is \boxed{18}.", "18"),
        (r"first \boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"nested \boxed{\sqrt{\frac{a^{2}}{b}}} done", r"\sqrt{\frac{a^{2}}{b}}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{42}", "42"),
        (r"\boxed{7} and then \fbox{8}", "8"),
        (r"TeX style \boxed 5$.", "5"),
        (r"complete \boxed{3} then cut off \boxed{4", "3"),
        (r"cut off \boxed{4", None),
        ("no box, 17", None),
        ("", None),
    ],
)
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


def test_reference_answers():
    assert reference_answer("She makes 9 * 2 = $18.\n#### 18") == "18"
    assert reference_answer("... so\n#### 1,234") == "1234"
    assert reference_answer(r"Thus the answer is $\boxed{\frac{14}{3}}$.") == r"\frac{14}{3}"
    assert reference_answer(r"\left( 3, \frac{\pi}{2} \right)") == r"\left( 3, \frac{\pi}{2} \right)"
    assert reference_answer(42) == "42"


# ---------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pred, ref",
    [
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac{1}{2}", "1/2"),
        ("1,000", "1000"),
        ("18", "18"),
        (r"\$18.00", "18"),
        ("x=5", "5"),
        (r"90^\circ", "90"),
        ("3, 5, 7", "3,5,7"),
        (r"\text{Evelyn}", "Evelyn"),
        ("6 - 5i", "6-5i"),
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\frac{\sqrt2}{2}", r"\sqrt{2}/2"),
    ],
)
def test_equivalent_forms(pred, ref):
    assert is_equiv(pred, ref)


@pytest.mark.parametrize("pred, ref", [("2", "3"), ("1/2", "2"), ("", "5"), (None, "5"), ("12", "1,2000")])
def test_not_equivalent(pred, ref):
    assert not is_equiv(pred, ref)


def test_grade_response():
    g = grade(r"So 16 - 3 - 4 = 9 eggs, 9 * 2 = 18. \boxed{\$18}", "18")
    assert g.extracted == r"\$18" and g.correct
    g = grade("The answer is 18.", "18")  # no box: wrong
    assert g.extracted is None and not g.correct
    assert not grade(None, "1").correct


def test_grading_is_robust(monkeypatch):
    # math-verify raising: the numeric fallback still decides
    monkeypatch.setattr(grading, "_mv_parse", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    assert is_equiv("1,000", "1000") and is_equiv("0.5", r"\frac{1}{2}") and not is_equiv("2", "3")
    # pathological inputs never raise
    for junk in ["\\boxed{" + "{" * 500 + "}" * 500 + "}", "\\boxed{\\frac{1}{0}}", "\\boxed{" + "9" * 5000 + "}"]:
        assert grade(junk, "1").correct is False


def test_pass_at_k():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 3) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong samples
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_maj_at_k():
    answers = ["0.5", r"\frac{1}{2}", "3", None, "1/2"]
    correct = [True, True, False, False, True]
    clusters = answer_clusters(answers)
    assert clusters[0] == clusters[1] == clusters[4] != clusters[2] and clusters[3] is None
    assert maj_at_k(clusters, correct, 5) == 1.0  # 3 votes for 1/2 beat 1 for 3
    assert maj_at_k(clusters, correct, 1) == pytest.approx(0.6)  # maj@1 == mean accuracy
    # Wrong majority: two votes for 7 (wrong) beat one for 5 (right)
    cl = answer_clusters(["7", "5", "7.0"])
    assert maj_at_k(cl, [False, True, False], 3) == 0.0
    # Ties go to the answer seen first; no answers at all -> wrong
    assert maj_at_k(answer_clusters(["5", "7"]), [True, False], 2) == 1.0
    assert maj_at_k(answer_clusters([None, None]), [False, False], 2) == 0.0


def test_score_and_acceptance():
    def rec(p, s, correct, ext, spec=None, toks=10):
        return SampleRecord(
            problem_idx=p,
            source_idx=p,
            sample_idx=s,
            question="q",
            reference="1",
            response="",
            extracted=ext,
            correct=correct,
            completion_tokens=toks,
            spec=spec,
        )

    spec = {
        "spec_verify_ct": 4,
        "spec_num_correct_drafts": 6,
        "spec_num_proposed_drafts": 12,
        "spec_accept_length": 2.5,
        "spec_correct_drafts_histogram": [1, 1, 0, 2],
    }
    recs = [rec(0, 0, True, "1", spec), rec(0, 1, False, "2", spec), rec(1, 0, False, "3"), rec(1, 1, False, None)]
    acc, pk, mk = score(recs, [1, 2])
    assert acc == 0.25 and pk == {"pass@1": 0.25, "pass@2": 0.5} and mk["maj@1"] == 0.25
    a = acceptance_stats(recs)
    assert a.samples == 2 and a.verify_ct == 8 and a.accept_rate == 0.5 and a.accept_length == 20 / 8
    assert a.correct_drafts_histogram == [2, 2, 0, 4]
    assert acceptance_stats(recs[2:]) is None
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([], 50) is None


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
def test_builtin_datasets():
    assert (data_root() / "gsm8k" / "test.jsonl").exists()
    g = load_problems("gsm8k", limit=3)
    assert len(g) == 3 and g[0].question.startswith("Janet") and g[0].reference == "18"
    assert all(p.reference and "####" not in p.reference for p in g)
    m = load_problems("math500", limit=2)
    assert m[0].reference == r"\left( 3, \frac{\pi}{2} \right)" and m[0].question.startswith("Convert")
    assert len(load_problems("math500")) == 500
    a = load_problems("gsm8k", limit=5, shuffle=True, seed=1)
    b = load_problems("gsm8k", limit=5, shuffle=True, seed=1)
    assert [p.source_idx for p in a] == [p.source_idx for p in b] != list(range(5))
    assert load_problems("gsm8k:train", limit=1)[0].question.startswith("Natalia")


def test_jsonl_dataset_and_fields(tmp_path, monkeypatch):
    path = tmp_path / "custom.jsonl"
    rows = [
        {"q": "What is 1+1?", "final": 2, "problem": "decoy"},
        {"q": "Half of 1?", "final": r"\frac{1}{2}", "problem": "decoy"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ps = load_problems(str(path), question_field="q", answer_field="final")
    assert [(p.question, p.reference) for p in ps] == [("What is 1+1?", "2"), ("Half of 1?", r"\frac{1}{2}")]
    # auto-detection: problem/solution
    auto = tmp_path / "auto.jsonl"
    auto.write_text(json.dumps({"problem": "P", "solution": r"so $\boxed{7}$"}) + "\n")
    (p,) = load_problems(str(auto))
    assert p.question == "P" and p.reference == "7"
    with pytest.raises(DatasetError, match="answer field"):
        load_problems(str(path), question_field="q")  # no answer/solution field to detect
    with pytest.raises(DatasetError, match="nope"):
        load_problems(str(path), question_field="nope", answer_field="final")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_problems(str(tmp_path / "missing.jsonl"))
    # SGLANG_ER_DATA moves the built-in data root
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "Q", "answer": "x\n#### 5"}) + "\n")
    monkeypatch.setenv("SGLANG_ER_DATA", str(tmp_path))
    assert [p.reference for p in load_problems("gsm8k")] == ["5"]


def test_hf_dataset_error_is_clear(monkeypatch):
    import sys
    import types

    def offline(*a, **k):
        raise ConnectionError("no network")

    # A stand-in `datasets` module: offline behaviour without importing the real (slow) package
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DatasetError, match="could not load Hugging Face dataset 'openai/gsm8k'.*split 'test'"):
        load_problems("hf:openai/gsm8k:main:test")


# ---------------------------------------------------------------------------------------------
# Responses (shapes as SGLang 0.5.23 returns them with speculative decoding on)
# ---------------------------------------------------------------------------------------------
SPEC = {
    "spec_accept_rate": 0.8,
    "spec_accept_length": 4.0,
    "spec_cap_length": 0.0,
    "spec_num_correct_drafts": 8,
    "spec_num_proposed_drafts": 9,
    "spec_verify_ct": 3,
    "spec_correct_drafts_histogram": [0, 0, 1, 2],
}


def test_parse_openai_completions_with_sglext():
    body = {
        "choices": [
            {"index": 1, "text": "b", "finish_reason": "stop"},
            {"index": 0, "text": "a", "finish_reason": "length"},
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20},
        "sglext": {"spec_tokens_details": [SPEC, {**SPEC, "spec_accept_length": 2.0, "spec_verify_ct": 4}]},
    }
    a, b = parse_response(body, api="openai", chat=False)
    assert (a.text, a.finish_reason, b.text) == ("a", "length", "b")
    assert a.spec["spec_verify_ct"] == 3 and b.spec["spec_verify_ct"] == 4
    assert (a.completion_tokens, b.completion_tokens) == (12, 8)  # accept_length * verify_ct
    (one,) = parse_response(
        {"choices": [{"index": 0, "text": "x"}], "usage": {"completion_tokens": 7}}, api="openai", chat=False
    )
    assert one.completion_tokens == 7 and one.spec is None


def test_parse_chat_meta_info_and_native():
    meta = {"completion_tokens": 12, "prompt_tokens": 26, "finish_reason": {"type": "length"}, **SPEC}
    body = {
        "choices": [{"index": 0, "message": {"content": r"\boxed{1}"}, "finish_reason": "length", "meta_info": meta}],
        "usage": {"completion_tokens": 12},
    }
    (c,) = parse_response(body, api="openai", chat=True)
    assert c.text == r"\boxed{1}" and c.completion_tokens == 12 and c.spec["spec_accept_length"] == 4.0
    native = [{"text": "t1", "meta_info": meta}, {"text": "t2", "meta_info": {"completion_tokens": 3}}]
    x, y = parse_response(native, api="native", chat=True)
    assert x.finish_reason == "length" and x.spec["spec_num_correct_drafts"] == 8 and y.spec is None
    (z,) = parse_response({"text": "t", "meta_info": meta}, api="native", chat=False)
    assert z.prompt_tokens == 26


def test_config_validation():
    with pytest.raises(ValueError):
        EvalConfig(n=2, ks=[4])
    with pytest.raises(ValueError):
        EvalConfig(n=2, seed=1, n_mode="batched")
    assert "boxed{}" in INSTRUCTION


# ---------------------------------------------------------------------------------------------
# End to end: a real tiny server, the CLI, the OpenAI chat endpoint
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(plain):
    return plain  # the session's float32 plain server (conftest)


def test_end_to_end(server, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "--base-url",
            server.url,
            "--dataset",
            "gsm8k",
            "--limit",
            "4",
            "--n",
            "2",
            "--max-tokens",
            "16",
            "--temperature",
            "1.0",
            "--concurrency",
            "8",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "pass@2" in table and "maj@2" in table and "makespan" in table

    lines = (out / "samples.jsonl").read_text().splitlines()
    samples = [SampleRecord.model_validate_json(line) for line in lines]
    assert len(samples) == 8 and not any(s.error for s in samples)
    assert sorted((s.problem_idx, s.sample_idx) for s in samples) == [(p, j) for p in range(4) for j in range(2)]
    assert all(0 < (s.completion_tokens or 0) <= 16 and s.latency_s > 0 for s in samples)

    summary = Summary.model_validate_json((out / "summary.json").read_text())
    assert summary.num_samples == 8 and summary.num_problems == 4 and summary.n == 2
    # the summary's scores are the samples' grades: mean@n, and pass@2 = share of problems with a correct sample
    assert summary.accuracy == pytest.approx(sum(s.correct for s in samples) / 8)
    solved = [any(s.correct for s in samples if s.problem_idx == p) for p in range(4)]
    assert set(summary.pass_at_k) == {"pass@1", "pass@2"}
    assert summary.pass_at_k["pass@2"] == pytest.approx(sum(solved) / 4)
    assert summary.pass_at_k["pass@1"] == pytest.approx(summary.accuracy)
    assert summary.endpoint == "/v1/chat/completions"
    assert summary.output_tokens == sum(s.completion_tokens for s in samples)
    assert summary.makespan_s > 0 and summary.output_tokens_per_s > 0
    lat = summary.latency_s
    assert lat.count == 8 and lat.p50 <= lat.p90 <= lat.p99 <= lat.max <= summary.makespan_s + 1e-6
    assert summary.acceptance is None  # plain decoding reports no speculation
