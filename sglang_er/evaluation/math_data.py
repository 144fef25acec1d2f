"""Math datasets for the eval harness: a GSM8K sample that ships with the package, GSM8K and
MATH-500 from a data directory, any JSONL file, or a Hugging Face dataset (``hf:NAME[:CONFIG]:SPLIT``).

``gsm8k-sample``: the first 50 questions of GSM8K's test split (MIT, see ``sglang_er/data/LICENSE-GSM8K``),
inside the package. ``gsm8k`` and ``math500`` (optionally ``gsm8k:train``) are read from
``$SGLANG_ER_DATA/{gsm8k,math500}/<split>.jsonl``; nothing is looked up outside the package unless
``SGLANG_ER_DATA`` says where (the checkout's ``eval`` package points it at ``../shared/data``).

Fields: the question is read from ``--question-field`` or the first of ``question``, ``problem``
present; the reference from ``--answer-field`` or the first of ``answer``, ``solution``. The final
reference answer is taken from it as GSM8K's ``#### n``, a solution's last ``\\boxed{}``, or the
value as is (MATH-500's ``answer``).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from sglang_er.evaluation.grading import reference_answer

QUESTION_FIELDS = ("question", "problem", "prompt", "input")
ANSWER_FIELDS = ("answer", "solution", "final_answer", "target", "output")

# name -> (directory under the data root, default split)
BUILTIN = {"gsm8k": ("gsm8k", "test"), "math500": ("math500", "test")}
SAMPLE = "gsm8k-sample"  # packaged: GSM8K's first 50 test questions
SAMPLE_PATH = Path(__file__).resolve().parent.parent / "data" / "gsm8k_sample.jsonl"
DATA_ENV = "SGLANG_ER_DATA"


class DatasetError(ValueError):
    pass


class Problem(BaseModel):
    idx: int  # position in the loaded (possibly shuffled / limited) list
    source_idx: int  # row number in the source
    question: str
    reference: str  # final answer
    raw_reference: str  # the answer field as stored


def data_root() -> Path | None:
    """``$SGLANG_ER_DATA`` (the directory holding ``gsm8k/`` and ``math500/``), or None when unset."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else None


def builtin_path(name: str, split: str | None = None) -> Path:
    sub, default_split = BUILTIN[name]
    root = data_root()
    file = f"{sub}/{split or default_split}.jsonl"
    if root is None:
        raise DatasetError(
            f"dataset {name!r} is not shipped with sglang-er: set {DATA_ENV} to a directory holding {file}, "
            f"pass a .jsonl path, or use {SAMPLE!r} (GSM8K's first 50 test questions, packaged)"
        )
    path = root / file
    if not path.exists():
        raise DatasetError(f"dataset {name!r}: {path} not found (set {DATA_ENV} to the directory holding {file})")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not JSON: {e}") from e
    return rows


def load_hf(spec: str) -> list[dict]:
    """``NAME``, ``NAME:SPLIT`` or ``NAME:CONFIG:SPLIT`` via ``datasets.load_dataset``."""
    parts = spec.split(":")
    name, config, split = parts[0], None, "test"
    if len(parts) == 2:
        split = parts[1] or split
    elif len(parts) >= 3:
        config, split = parts[1] or None, parts[2] or split
    try:
        import datasets
    except ImportError as e:
        raise DatasetError(f"hf:{spec}: the `datasets` package is not installed") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise DatasetError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Offline? Export it to JSONL and pass the file path instead."
        ) from e
    return [dict(r) for r in ds]


def pick_field(rows: list[dict], wanted: str | None, candidates: Iterable[str], what: str, origin: str) -> str:
    if not rows:
        raise DatasetError(f"{origin}: no rows")
    keys = list(rows[0].keys())
    if wanted:
        if wanted not in rows[0]:
            raise DatasetError(f"{origin}: no {what} field {wanted!r}; fields are {keys}")
        return wanted
    for c in candidates:
        if c in rows[0]:
            return c
    raise DatasetError(f"{origin}: cannot tell the {what} field among {keys}; pass --{what}-field")


def load_problems(
    dataset: str,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> list[Problem]:
    """Load ``dataset``: ``gsm8k-sample`` | ``gsm8k`` | ``math500`` (optionally ``gsm8k:train``) | a
    ``.jsonl`` path | ``hf:NAME[:CONFIG]:SPLIT``. ``shuffle`` draws the ``limit`` problems at random (seeded)."""
    origin = dataset
    head, _, split = dataset.partition(":")
    if dataset.startswith("hf:"):
        rows = load_hf(dataset[3:])
    elif dataset == SAMPLE:
        origin = str(SAMPLE_PATH)
        rows = read_jsonl(SAMPLE_PATH)
    elif head in BUILTIN:
        origin = str(builtin_path(head, split or None))
        rows = read_jsonl(origin)
    elif Path(dataset).expanduser().is_file():
        rows = read_jsonl(Path(dataset).expanduser())
    else:
        raise DatasetError(
            f"unknown dataset {dataset!r}: use {' | '.join([SAMPLE, *BUILTIN])} | PATH.jsonl | hf:NAME[:split]"
        )
    qf = pick_field(rows, question_field, QUESTION_FIELDS, "question", origin)
    af = pick_field(rows, answer_field, ANSWER_FIELDS, "answer", origin)
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[: max(0, limit)]
    problems = []
    for i, src in enumerate(order):
        row = rows[src]
        if qf not in row or af not in row:
            raise DatasetError(f"{origin}: row {src} lacks {qf!r} or {af!r}")
        raw = row[af]
        raw_s = raw if isinstance(raw, str) else json.dumps(raw) if isinstance(raw, (list, dict)) else str(raw)
        problems.append(
            Problem(
                idx=i,
                source_idx=src,
                question=str(row[qf]),
                reference=reference_answer(raw_s),
                raw_reference=raw_s,
            )
        )
    return problems
