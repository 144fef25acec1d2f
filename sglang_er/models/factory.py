"""Write complete local HF model directories from code: tokenizer, config, random weights.

Tests, the demo and the benchmarks need models without a model hub. ``build_model("tiny")``
returns a directory SGLang and transformers load like any checkpoint. Builds are
deterministic (seeded) and cached under a content key, so a second call is free.

Random weights are scaled so the next-token distribution is peaked (logit std ``logit_std``)
rather than near-uniform: temperature-1 sampling then behaves like a trained model's, which
matters for acceptance-rate and distribution tests. ``mean_entropy`` measures it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

FACTORY_VERSION = 2  # bump when the bytes a spec produces change

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only model. ``vocab_size`` may exceed the tokenizer's (as in Qwen2)."""

    arch: str  # "qwen2" | "llama"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tokenizer_vocab: int = 512
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    logit_std: float = 4.0
    extra: dict = field(default_factory=dict)

    def key(self, seed: int) -> str:
        blob = json.dumps({"spec": asdict(self), "seed": seed, "v": FACTORY_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


SPECS: dict[str, ModelSpec] = {
    # < 5 M parameters: fast tests. Widths are multiples of 128 so W4 group-128 applies as is.
    "tiny": ModelSpec("qwen2", 128, 384, 4, 4, 2, 512),
    "tiny-llama": ModelSpec("llama", 128, 384, 4, 4, 2, 512),
    # The real Qwen2-0.5B shapes (random weights) for speed benchmarks.
    "qwen2-0.5b": ModelSpec(
        "qwen2",
        896,
        4864,
        24,
        14,
        2,
        151936,
        tokenizer_vocab=4096,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SGLANG_ER_CACHE", Path.home() / ".cache" / "sglang-er")) / "models"


def build_model(name: str, *, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Return the directory of model ``name``, building it on first use."""
    from sglang_er.models.realmodel import MODELS as REAL_MODELS
    from sglang_er.models.realmodel import build_real

    if name in REAL_MODELS:
        return build_real(name, cache_dir=cache_dir)
    if name == "gsm8k-lm":
        from sglang_er.models.trained import TrainConfig, build_trained

        return build_trained(cache_dir=cache_dir, cfg=TrainConfig(seed=seed))
    if name == "gsm8k-lm-rl":
        from sglang_er.models.trained import build_sharpened

        return build_sharpened(cache_dir=cache_dir)
    if name not in SPECS:
        known = ", ".join([*SPECS, *REAL_MODELS, "gsm8k-lm", "gsm8k-lm-rl"])
        raise ValueError(f"unknown model {name!r}; choose one of: {known}")
    spec = SPECS[name]

    def write(tmp: Path) -> None:
        _write_tokenizer(tmp, spec.tokenizer_vocab)
        _write_config(tmp, spec)
        _write_weights(tmp, spec, seed)

    return cached_build(Path(cache_dir) if cache_dir else default_cache_dir(), f"{name}-{spec.key(seed)}", write)


def cached_build(root: Path, dirname: str, write) -> Path:
    """``root/dirname``, written by ``write(tmp_dir)`` on first use into a temporary directory
    that is renamed into place, so a finished directory is always complete. Concurrent callers
    (servers or workers starting together) take turns on a lock file, so the model is converted
    once and the others wait for it instead of converting it again."""
    from filelock import FileLock

    out = root / dirname
    if (out / "model.safetensors").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{dirname}.lock")):
        if (out / "model.safetensors").exists():  # built while this caller waited
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}-", dir=root))
        try:
            write(tmp)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _write_tokenizer(out: Path, vocab_size: int, corpus=None) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from sglang_er.models.corpus import math_corpus

    tok = Tokenizer(models.BPE())
    # Qwen2's pre-tokenizer, exactly as transformers v5 rebuilds it for Qwen2Tokenizer: then
    # SGLang (which restores tokenizer.json's components) and transformers tokenize alike.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else math_corpus(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": 4096,
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=1)
    )


def _token_id(out: Path, token: str) -> int:
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    added = {t["content"]: t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    return added.get(token, vocab.get(token))


def _write_config(out: Path, spec: ModelSpec) -> None:
    eos = _token_id(out, "<|im_end|>")
    pad = _token_id(out, "<|endoftext|>")
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[spec.arch]
    cfg = {
        "architectures": [arch],
        "model_type": spec.arch,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.hidden_size // spec.num_attention_heads,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "bos_token_id": pad,
        "eos_token_id": eos,
        "pad_token_id": pad,
        **({"use_sliding_window": False, "sliding_window": None} if spec.arch == "qwen2" else {}),
        **({"attention_bias": False, "mlp_bias": False} if spec.arch == "llama" else {}),
        **spec.extra,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad}, indent=1)
    )


def _write_weights(out: Path, spec: ModelSpec, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    d, inter = spec.hidden_size, spec.intermediate_size
    hd = d // spec.num_attention_heads
    q_out, kv_out = spec.num_attention_heads * hd, spec.num_key_value_heads * hd

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    head_std = spec.logit_std / d**0.5  # final RMSNorm makes |h|^2 ~ d, so logits ~ N(0, logit_std^2)
    t = {"model.embed_tokens.weight": randn(spec.vocab_size, d, std=head_std if spec.tie_word_embeddings else 1.0)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = ones(d)
        t[p + "post_attention_layernorm.weight"] = ones(d)
        for name, rows in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            t[p + f"self_attn.{name}.weight"] = randn(rows, d, std=d**-0.5)
            if spec.arch == "qwen2":
                t[p + f"self_attn.{name}.bias"] = randn(rows, std=0.02)
        t[p + "self_attn.o_proj.weight"] = randn(d, q_out, std=q_out**-0.5)
        t[p + "mlp.gate_proj.weight"] = randn(inter, d, std=d**-0.5)
        t[p + "mlp.up_proj.weight"] = randn(inter, d, std=d**-0.5)
        t[p + "mlp.down_proj.weight"] = randn(d, inter, std=inter**-0.5)
    t["model.norm.weight"] = ones(d)
    if not spec.tie_word_embeddings:
        t["lm_head.weight"] = randn(spec.vocab_size, d, std=head_std)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})


def mean_entropy(model_dir: str | Path, num_prompts: int = 8, new_tokens: int = 16) -> float:
    """Mean next-token entropy (nats) along greedy continuations of corpus prompts (transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_er.models.corpus import math_corpus

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ents = []
    with torch.no_grad():
        for text in math_corpus(num_prompts, seed=1)[:num_prompts]:
            ids = tok(text[:80], return_tensors="pt").input_ids
            for _ in range(new_tokens):
                logits = model(ids).logits[0, -1]
                ents.append(torch.distributions.Categorical(logits=logits).entropy().item())
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return sum(ents) / len(ents)
