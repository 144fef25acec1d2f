"""The trained benchmark model (``gsm8k-lm``): data rewriting, and a short training run whose
output loads in transformers and learns (loss falls). The full build (500 steps, ~12 min) is the
benchmarks' job; here a few steps on a slice of the data prove the pipeline."""

from __future__ import annotations

import json

from sglang_er.models.trained import INSTRUCTION, TrainConfig, build_trained, conversations, data_path, solution


def test_solution_drops_calculator_marks_and_boxes_the_answer():
    ans = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 in all.\n#### 72"
    assert solution(ans) == (
        "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 in all.\nThe answer is \\boxed{72}."
    )


def test_prompts_match_the_eval_harness():
    from sglang_er.evaluation.records import INSTRUCTION as EVAL_INSTRUCTION

    assert INSTRUCTION == EVAL_INSTRUCTION
    q, a = conversations(data_path())[0]
    assert q.endswith("\n" + INSTRUCTION) and a.endswith("}.")


def _short_run(tmp_path):
    rows = data_path().read_text().splitlines()[:200]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(rows) + "\n")
    return TrainConfig(steps=12, batch=4, block=128, warmup=2), data


def test_short_training_run_builds_a_loadable_cached_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, data = _short_run(tmp_path)
    out = build_trained(cache_dir=tmp_path / "cache", cfg=cfg, data=data, log=lambda *_: None)
    assert build_trained(cache_dir=tmp_path / "cache", cfg=cfg, data=data) == out  # cached
    report = json.loads((out / "training.json").read_text())
    assert report["final_loss"] < 8.0  # from ln(4096) = 8.3 at initialisation
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["hidden_size"] % 128 == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert model(ids).logits.shape[-1] == config["vocab_size"]


def test_sharpened_model_is_the_trained_one_at_half_the_temperature(tmp_path):
    """gsm8k-lm-rl: logits exactly twice gsm8k-lm's (sampling it at T = 1 is sampling gsm8k-lm at 0.5)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sglang_er.models.trained import build_sharpened

    cfg, data = _short_run(tmp_path)
    base = build_trained(cache_dir=tmp_path / "cache", cfg=cfg, data=data, log=lambda *_: None)
    sharp = build_sharpened(cache_dir=tmp_path / "cache", cfg=cfg, data=data)
    assert sharp != base and build_sharpened(cache_dir=tmp_path / "cache", cfg=cfg, data=data) == sharp
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    logits = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)(ids).logits for p in (base, sharp)]
    torch.testing.assert_close(logits[1], 2 * logits[0], rtol=1e-4, atol=1e-4)
