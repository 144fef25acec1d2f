"""Models from code: deterministic, cached by content key, loadable, peaked."""

import hashlib
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from sglang_er.models.factory import SPECS, build_model, cached_build, mean_entropy


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic_and_cached(tmp_path):
    a = build_model("tiny", cache_dir=tmp_path / "a")
    b = build_model("tiny", cache_dir=tmp_path / "b")
    assert _digest(a) == _digest(b)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert build_model("tiny", cache_dir=tmp_path / "a") == a  # cache hit, same path
    assert build_model("tiny", seed=1, cache_dir=tmp_path / "a") != a


def test_callers_building_together_convert_once(tmp_path):
    """Servers started together on a model not yet cached: one converts, the others wait for it."""
    calls, started = [], threading.Event()

    def write(tmp):
        calls.append(tmp)
        started.set()
        time.sleep(0.5)  # still converting when the other callers arrive
        (tmp / "model.safetensors").write_bytes(b"weights")

    def build(i):
        if i:
            started.wait()
        return cached_build(tmp_path, "m", write)

    with ThreadPoolExecutor(3) as ex:
        outs = list(ex.map(build, range(3)))
    assert outs == [tmp_path / "m"] * 3 and len(calls) == 1
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "m"]  # no temporary dir left


def test_tiny_shapes_and_size(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    s = SPECS["tiny"]
    per_layer = s.hidden_size * (s.hidden_size + 2 * 64) + s.hidden_size**2 + 3 * s.hidden_size * s.intermediate_size
    assert 2 * s.vocab_size * s.hidden_size + s.num_hidden_layers * per_layer < 5_000_000


def test_chat_template_and_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok("Alice has 12 apples.").input_ids
    assert tok.decode(ids) == "Alice has 12 apples."


def test_random_weights_are_peaked(tiny_model):
    # Uniform over 512 tokens would be ln(512) = 6.24 nats.
    assert mean_entropy(tiny_model, num_prompts=2, new_tokens=8) < 0.6 * math.log(512)


def test_unknown_model_names_the_choices():
    import pytest

    with pytest.raises(ValueError, match="tiny"):
        build_model("gpt-17")
