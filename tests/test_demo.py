"""The README's main command (``sglang_er.demo``) without servers: its questions ship with the
package, its report is built from the eval's samples and the worker's own counters, and it ends
with the command for the real 0.5B policy (the command itself runs end to end in ``make demo``)."""

from __future__ import annotations

import json
import types

import pytest

from sglang_er import demo
from sglang_er.evaluation.math_data import SAMPLE, SAMPLE_PATH, load_problems


def _summary(out_dir, tok_s: float, accuracy: float):
    return types.SimpleNamespace(
        out_dir=str(out_dir),
        accuracy=accuracy,
        accuracy_flexible=accuracy,
        makespan_s=160 / tok_s,
        output_tokens=160,
        output_tokens_per_s=tok_s,
        latency_s=types.SimpleNamespace(p50=2.0),
    )


def _samples(out_dir) -> None:
    out_dir.mkdir(parents=True)
    (out_dir / "samples.jsonl").write_text(
        json.dumps({"question": "Q?", "response": r"so \boxed{18}", "reference": "18", "correct": True}) + "\n"
    )


def test_the_demo_questions_ship_with_the_package():
    ps = load_problems(SAMPLE)
    assert len(ps) == 50 and ps[0].question.startswith("Janet") and ps[0].reference == "18"
    assert (SAMPLE_PATH.parent / "LICENSE-GSM8K").read_text().startswith("MIT License")
    demo.check_dataset(SAMPLE, 50)
    with pytest.raises(ValueError, match="has 50 questions"):
        demo.check_dataset(SAMPLE, 51)


def test_gsm8k_without_a_data_directory_names_the_fix(monkeypatch):
    from sglang_er.evaluation.math_data import DatasetError

    monkeypatch.delenv("SGLANG_ER_DATA", raising=False)
    with pytest.raises(DatasetError, match="SGLANG_ER_DATA.*gsm8k/test.jsonl.*'gsm8k-sample'"):
        load_problems("gsm8k")


def test_report_from_the_eval_summaries_and_the_workers_counters(tmp_path):
    assert demo.speculation_counters(None) is None  # a plain server reports no worker state
    counters = demo.speculation_counters(
        {"metrics": {"iterations_spec": 9, "iterations_plain": 3, "drafted": 30, "accepted": 21}}
    )
    _samples(tmp_path / "effrollout")
    plain, eff = _summary(tmp_path / "plain", 10.0, 0.5), _summary(tmp_path / "effrollout", 15.0, 0.75)
    rows = demo.report_rows(plain, eff, counters)
    assert ("draft acceptance rate", "-", "0.700") in rows and ("iterations spec / plain", "-", "9 / 3") in rows
    path = demo.write_report(tmp_path, "2 questions", rows, 1.5, demo._first_sample(eff))
    text = path.read_text()
    assert "| draft acceptance rate | - | 0.700 |" in text and "| throughput ratio | | 1.50x |" in text
    assert r"A: so \boxed{18}" in text and demo.REAL_MODEL_COMMAND in text


def test_the_demo_ends_with_the_real_model_command(tmp_path, monkeypatch, capsys):
    def rollout(_path, server_args, args, label):
        _samples(tmp_path / "out" / label)
        counters = {"spec_iterations": 4, "plain_iterations": 1, "drafted": 16, "accepted": 8} if server_args else None
        return _summary(tmp_path / "out" / label, 12.0 if server_args else 10.0, 0.5), counters

    monkeypatch.setattr(demo, "build_model", lambda name: tmp_path / name)
    monkeypatch.setattr(demo, "_rollout", rollout)
    assert demo.main(["--model", "tiny", "--questions", "2", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "draft acceptance rate" in out and (tmp_path / "out" / "report.md").exists()
    assert out.rstrip().splitlines()[-1].strip() == demo.REAL_MODEL_COMMAND
    assert demo.REAL_MODEL_COMMAND == (
        "python -m sglang_er.demo --model qwen2.5-0.5b-instruct --questions 2 --n 2 --max-tokens 256"
    )
