"""``gsm8k-lm``: a small causal LM trained on the GSM8K train split, for benchmarks.

Random weights give acceptance rates unlike a real policy's (flat or arbitrarily peaked
distributions); SmolLM2 is real but slow here and was not trained on the benchmark's format.
This model is trained in minutes on 2 CPU cores, on exactly the prompts the eval harness sends
(chat template, question + the \\boxed{} instruction) and GSM8K's worked solutions rewritten to end
in ``The answer is \\boxed{n}.``, so its next-token distributions are peaked the way a trained
policy's are, its samples of one prompt share phrasing (what history drafts feed on) and its
outputs end at EOS after a long-tailed number of tokens.

    build_trained(data=PATH)           # cached directory, trained on first use (~10 min)
    python -m sglang_er.models.trained [--steps N] [--data train.jsonl] [--cache-dir DIR]

A benchmark model, not a runtime feature: it needs GSM8K's train split, which does not ship with the
package. Pass ``data=`` / ``--data``, or set ``SGLANG_ER_DATA`` to a directory holding
``gsm8k/train.jsonl`` (``build_model("gsm8k-lm")`` and ``sglang-er model gsm8k-lm`` read that;
the checkout's ``eval`` package sets it to ``../shared/data``).

Deterministic given (spec, steps, seed, data file): the cache key covers all four. Shapes are
Qwen2 (SGLang serves it natively), widths multiples of 128 so W4 group-128 applies as is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sglang_er.models.factory import (
    ModelSpec,
    _token_id,
    _write_config,
    _write_tokenizer,
    cached_build,
    default_cache_dir,
)

NAME = "gsm8k-lm"
TRAINER_VERSION = 1  # bump when the bytes a build produces change
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SPEC = ModelSpec(
    "qwen2", 512, 1536, 4, 8, 4, 4096, tokenizer_vocab=4096, tie_word_embeddings=True, max_position_embeddings=2048
)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    batch: int = 16
    block: int = 256  # tokens per row; examples are packed back to back, separated by EOS
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0


def data_path() -> Path:
    """GSM8K's train split: ``$SGLANG_ER_DATA/gsm8k/train.jsonl`` (the same place the eval harness
    looks). Raises FileNotFoundError, naming what to set, when it is unset or the file is missing."""
    root = os.environ.get("SGLANG_ER_DATA")
    if not root:
        raise FileNotFoundError(
            f"{NAME} trains on GSM8K's train split, which does not ship with sglang-er: set SGLANG_ER_DATA to a "
            "directory holding gsm8k/train.jsonl (grade_school_math/data/train.jsonl from "
            "github.com/openai/grade-school-math), or pass build_trained(data=PATH) / "
            "`python -m sglang_er.models.trained --data PATH`"
        )
    path = Path(root) / "gsm8k" / "train.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: set SGLANG_ER_DATA to the directory holding gsm8k/train.jsonl, "
            "or pass build_trained(data=PATH) / --data PATH"
        )
    return path


def solution(answer: str) -> str:
    """GSM8K's worked answer with calculator annotations dropped and ``#### n`` as ``\\boxed{n}``."""
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is \\boxed{{{final.strip()}}}."


def conversations(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(f"{r['question'].strip()}\n{INSTRUCTION}", solution(r["answer"])) for r in rows]


def build_trained(
    *, cache_dir: str | Path | None = None, cfg: TrainConfig = TrainConfig(), data: Path | None = None, log=print
) -> Path:
    """Return the trained model's directory, training it on first use."""
    data = Path(data) if data else data_path()
    digest = hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    key = hashlib.sha256(
        json.dumps(
            {"spec": asdict(SPEC), "train": asdict(cfg), "data": digest, "v": TRAINER_VERSION}, sort_keys=True
        ).encode()
    ).hexdigest()[:12]

    def write(tmp: Path) -> None:
        convs = conversations(data)
        _write_tokenizer(tmp, SPEC.tokenizer_vocab, corpus=[f"{q}\n{a}" for q, a in convs])
        _write_config(tmp, SPEC)
        report = _train(tmp, convs, cfg, log)
        (tmp / "training.json").write_text(json.dumps({"train": asdict(cfg), "data": str(data), **report}, indent=1))

    return cached_build(Path(cache_dir) if cache_dir else default_cache_dir(), f"{NAME}-{key}", write)


SHARP_NAME = "gsm8k-lm-rl"


def build_sharpened(
    *,
    sharpness: float = 2.0,
    cache_dir: str | Path | None = None,
    cfg: TrainConfig = TrainConfig(),
    data: Path | None = None,
) -> Path:
    """``gsm8k-lm-rl``: the trained model with its final RMSNorm weight times ``sharpness``, so its
    logits are ``sharpness`` times gsm8k-lm's and sampling it at temperature 1 samples gsm8k-lm at
    ``1 / sharpness``. It stands for a policy late in GRPO, whose entropy has collapsed, for
    benchmarks of that regime. Its samples still diverge at this sharpness: history proposals
    commit E[L] 1.0-1.5 of 7 (``python -m eval.history_probe --model gsm8k-lm-rl``), against
    0.5-2.0 on gsm8k-lm. Built from gsm8k-lm in seconds."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = build_trained(cache_dir=cache_dir, cfg=cfg, data=data)

    def write(tmp: Path) -> None:
        for f in base.iterdir():
            if f.is_file() and f.name != "model.safetensors":
                shutil.copy2(f, tmp / f.name)
        weights = load_file(base / "model.safetensors")
        weights["model.norm.weight"] = (weights["model.norm.weight"].float() * sharpness).to(
            weights["model.norm.weight"].dtype
        )
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "sharpened.json").write_text(json.dumps({"base": base.name, "sharpness": sharpness}))

    return cached_build(
        Path(cache_dir) if cache_dir else default_cache_dir(),
        f"{SHARP_NAME}-{base.name.rsplit('-', 1)[-1]}-s{sharpness:g}",
        write,
    )


def _rows(tok, convs, eos: int, cfg: TrainConfig, g):
    """Every conversation through the chat template, shuffled, packed into [N, block] rows."""
    import torch

    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False)
        for q, a in convs
    ]
    order = torch.randperm(len(texts), generator=g).tolist()
    ids: list[int] = []
    for i in order:
        ids += tok(texts[i], add_special_tokens=False)["input_ids"] + [eos]
    n = len(ids) // cfg.block
    return torch.tensor(ids[: n * cfg.block]).view(n, cfg.block)


def _train(out: Path, convs, cfg: TrainConfig, log) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(out)
    rows = _rows(tok, convs, _token_id(out, "<|endoftext|>"), cfg, g)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), torch_dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
    )
    log(
        f"{NAME}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {rows.numel()} "
        f"tokens ({len(convs)} solutions), {cfg.steps} steps x {cfg.batch} x {cfg.block}"
    )
    t0, losses = time.time(), []
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, rows.shape[0], (cfg.batch,), generator=g)
        x = rows[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # ~2x on CPUs with bf16 units, exact weights in fp32
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"  step {step:4d}  loss {sum(losses[-50:]) / len(losses[-50:]):.3f}  {time.time() - t0:.0f} s")
    # keep the factory's config files: save_pretrained rewrites them in transformers' newest format
    kept = {f: (out / f).read_text() for f in ("config.json", "generation_config.json")}
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for f, text in kept.items():
        (out / f).write_text(text)
    return {
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "seconds": round(time.time() - t0, 1),
        "epochs": round(cfg.steps * cfg.batch / rows.shape[0], 2),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument(
        "--data", type=Path, default=None, help="GSM8K train.jsonl (default: $SGLANG_ER_DATA/gsm8k/train.jsonl)"
    )
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    print(build_trained(cache_dir=args.cache_dir, cfg=TrainConfig(steps=args.steps), data=args.data))


if __name__ == "__main__":
    main()
