"""The rollout benchmark end to end on the tiny model: a real EFFROLLOUT (auto) server, a
GRPO-shaped workload, a policy step pushed with update_weights_from_tensor, and a report with
plots whose numbers add up (one config keeps the suite fast; the plain-vs-EFFROLLOUT ratios are
the same code path). Timing is not asserted (benchmarks, not tests, measure speed)."""

from __future__ import annotations

import json

import pytest

from eval.report import active_over_time, length_summary, speedup_interval, tail_share, time_by_batch
from eval.rollout_bench import main, parse_config


def test_rollout_bench_writes_a_consistent_report(tmp_path, tiny_model):
    out = tmp_path / "rollout"
    rc = main(
        [
            "--model-path",
            str(tiny_model),
            "--prompts",
            "3",
            "--n",
            "2",
            "--max-tokens",
            "24",
            "--configs",
            "auto",
            "--policy-steps",
            "2",
            "--epochs",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    for f in ("report.md", "results.json", "throughput.png", "timeline.png", "latency_cdf.png"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    rolls = res["rollouts"]
    assert [(r["config"], r["step"], r["epoch"]) for r in rolls] == [
        ("auto", 0, 0),
        ("auto", 0, 1),
        ("auto", 1, 0),
        ("auto", 1, 1),
    ]
    for r in rolls:
        assert len(r["requests"]) == 6
        assert r["output_tokens"] == sum(q["tokens"] for q in r["requests"]) and 0 < r["output_tokens"] <= 6 * 24
        assert r["makespan_s"] > 0
    auto = [r for r in rolls if r["config"] == "auto"]
    assert auto[0]["timeline"]  # the auto config records its γ timeline
    assert auto[2]["requantize_s"] > 0  # the policy step re-quantized the drafter
    assert auto[1]["requantize_s"] is None and auto[3]["requantize_s"] is None  # epochs: same weights
    if any(r["position_acceptance"] for r in auto):
        assert (out / "acceptance.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| auto |" in report and "re-quantization" in report
    # every result file says how to re-run it and where it ran
    assert res["meta"]["command"].startswith("python -m eval.") and res["meta"]["model"] == tiny_model.name
    assert "- command: `" in report and "- machine: " in report and "- commit: " in report
    # every sample is graded; the report's accuracy is their mean
    graded = [q["correct"] for r in rolls for q in r["requests"]]
    assert len(graded) == 24
    assert f"| auto | {sum(graded) / len(graded):.3f} |" in report
    total = sum(r["makespan_s"] for r in rolls)  # the headline row is the total over the 4 rollouts
    assert f"| auto | {total:.1f} |" in report
    # where the time went: seconds by requests in flight add up to the makespans
    where = report.split("## Where the makespan goes")[1]
    row = next(line for line in where.splitlines() if line.startswith("| auto | "))
    secs = [time_by_batch(r["requests"]) for r in rolls]
    buckets = [sum(s[b] for s in secs) for b in secs[0]]
    assert [float(c) for c in row.split("|")[2:-1]] == [round(b, 1) for b in buckets]
    for r, s in zip(rolls, secs):  # each rollout's buckets cover its makespan
        assert sum(s.values()) == pytest.approx(r["makespan_s"], rel=0.02, abs=0.05)
    # the results file alone gives the same report again
    assert main(["--from-json", str(out / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == report


def test_same_lengths_replays_plains_draw(tmp_path, tiny_model):
    """--same-lengths: plain runs first with natural EOS, and the other config generates exactly
    the lengths plain drew, request by request (ignore_eos)."""
    out = tmp_path / "same"
    rc = main(
        [
            "--model-path",
            str(tiny_model),
            "--prompts",
            "2",
            "--n",
            "2",
            "--max-tokens",
            "24",
            "--configs",
            "fixed:2",
            "plain",
            "--same-lengths",
            "--epochs",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rolls = json.loads((out / "results.json").read_text())["rollouts"]
    for epoch in (0, 1):
        plain, fixed = (
            next(r for r in rolls if r["config"].startswith(c) and r["epoch"] == epoch) for c in ("plain", "fixed")
        )
        assert plain["extra"]["lengths"] == "natural" and fixed["extra"]["lengths"] == "replayed"
        assert [q["tokens"] for q in fixed["requests"]] == [q["tokens"] for q in plain["requests"]]
        assert all(q["past_eos"] is None for q in plain["requests"])
        assert all(0 <= q["past_eos"] < q["tokens"] or q["past_eos"] == 0 for q in fixed["requests"])
    assert "Tokens past each config's own EOS" in (out / "report.md").read_text()
    with pytest.raises(SystemExit, match="add plain to --configs"):
        main(["--model-path", str(tiny_model), "--configs", "auto", "--same-lengths", "--out", str(out)])


def test_own_answer_stops_at_the_first_eos():
    from eval.rollout_bench import _own_answer

    choice = {
        "message": {"content": "12<|im_end|>abc"},
        "logprobs": {"content": [{"token": t} for t in ("1", "2", "<|im_end|>", "a", "b", "c")]},
    }
    assert _own_answer(choice, {"<|im_end|>"}) == ("12", 3)
    assert _own_answer(choice, {"<|endoftext|>"}) == ("12<|im_end|>abc", 0)


def test_mean_at_n_interval_is_over_questions():
    from eval.report import mean_at_n

    reqs = [{"question": 0, "correct": True}] * 8 + [{"question": 1, "correct": False}] * 8
    mean, half, q = mean_at_n(reqs)
    assert (mean, q) == (0.5, 2)
    # two question means 1 and 0: sd 0.707, half-width 1.96 * 0.707 / sqrt(2) = 0.98
    assert abs(half - 0.98) < 1e-9
    assert mean_at_n([{"question": 0}]) is None


def test_tokens_past_eos():
    from eval.bench_spec import past_eos

    assert past_eos([5, 6, 2, 7, 8], {2}) == 2
    assert past_eos([5, 6, 7], {2}) == 0
    assert past_eos([2], {2, 3}) == 0


def test_active_requests_curve():
    reqs = [{"t_send": 0.0, "t_done": 10.0}, {"t_send": 0.0, "t_done": 2.0}, {"t_send": 1.0, "t_done": 5.0}]
    ts, active = active_over_time(reqs, 0.0, points=11)
    assert active[0] == 2 and max(active) == 3 and active[-1] == 0 and active[ts.index(6.0)] == 1


def test_speedup_interval_brackets_the_ratio_of_totals():
    plain, spec = [6.2, 6.1, 8.4, 5.9], [4.1, 4.6, 5.5, 4.4]
    lo, hi = speedup_interval(plain, spec)
    assert lo < sum(plain) / sum(spec) < hi
    assert speedup_interval(plain, spec) == (lo, hi)  # seeded: the report is reproducible
    assert speedup_interval([5.0] * 4, [5.0] * 4) == (1.0, 1.0)


def test_tail_share_and_lengths():
    # 8 requests sent at 0; 6 finish by t=2, the last two at 4 and 10: the tail (≤ 2 in flight) is 2..10
    reqs = [
        {"t_send": 0.0, "t_done": t, "tokens": n}
        for t, n in [(1, 10), (1, 11), (1.5, 12), (1.5, 13), (2, 14), (2, 15), (4, 40), (10, 100)]
    ]
    assert tail_share(reqs) == pytest.approx(0.8)
    assert length_summary(reqs) == "output tokens median 14, p90 100, longest 100"
    # in flight: 8 for 1 s, 6 for 0.5 s, 4 for 0.5 s, 2 for 2 s, 1 for 6 s
    assert time_by_batch(reqs) == {(1, 1): 6.0, (2, 3): 2.0, (4, 7): 1.0, (8, 15): 1.0, (16, 31): 0.0, (32, None): 0.0}


@pytest.mark.parametrize("bad", ["fixed:0", "fixed:x", "speculate", "fixed:99"])
def test_bad_config_names_the_fix(bad):
    with pytest.raises(ValueError, match="use plain, auto, hybrid, hybrid:group or fixed:G"):
        parse_config(bad)


def test_gamma_max_sets_the_ladder_of_auto_and_hybrid_only():
    assert parse_config("auto", 16)[1][-2:] == ["--speculative-num-steps", "16"]
    assert parse_config("hybrid", 12)[1][-2:] == ["--speculative-num-steps", "12"]
    assert parse_config("fixed:7", 16)[1][-2:] == ["--speculative-num-steps", "7"]
    with pytest.raises(ValueError, match="use 1..16"):
        parse_config("auto", 17)


def test_physics_bound_from_measured_acceptance_and_phase_times():
    from eval.spec_report import physics_bound

    cell = {"position_acceptance": [0.9, 0.8, 0.5], "t_draft_step": 0.25, "t_verify": 1.2}
    # E[L|2] = 1 + 0.9 + 0.9 * 0.8 = 2.62; cost 2 * 0.25 + 1.2 = 1.7 plain steps
    assert physics_bound(cell, 1.0, 2) == pytest.approx(2.62 / 1.7)
    assert physics_bound(cell, 2.0, 3) == pytest.approx((2.62 + 0.36) / (3 * 0.125 + 0.6))
    assert physics_bound(cell, None, 2) is None  # no γ = 0 server: no T_T
    assert physics_bound({**cell, "position_acceptance": [0.9]}, 1.0, 2) is None


def test_auto_at_other_gamma_max_is_a_policy_with_its_own_server_args():
    from eval.spec_configs import configurations, parser
    from eval.spec_report import best_other, is_policy

    args = parser("t").parse_args(["--gammas", "2", "--gamma-max", "4", "--auto-gamma-max", "8", "--skip-gamma0"])
    configs, spec = configurations(args)
    by_name = {c[0]: c for c in configs}
    assert set(by_name) == {"plain", "gamma=2", "auto", "auto/gmax8"}
    assert by_name["auto"][2][-2:] == ["--speculative-num-steps", "4"]
    assert by_name["auto/gmax8"][2][-2:] == ["--speculative-num-steps", "8"]
    assert by_name["auto/gmax8"][3]["SGLANG_ER_MODE"] == "auto"
    assert is_policy("auto/gmax8") and not is_policy("gamma=2")
    # auto is judged against plain and the fixed γ, never against another auto
    results = {
        (n, 1.0, 1): {"tok_s": t} for n, t in [("plain", 1.0), ("gamma=2", 2.0), ("auto", 2.1), ("auto/gmax8", 3.0)]
    }
    assert best_other(results, list(by_name), 1.0, 1) == ("gamma=2", 2.0)
    with pytest.raises(SystemExit, match="other than --gamma-max 4"):
        configurations(parser("t").parse_args(["--gammas", "2", "--gamma-max", "4", "--auto-gamma-max", "4"]))
