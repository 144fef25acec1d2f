"""Answer extraction and grading for math evals: ``\\boxed{}`` extraction, math-verify equivalence,
pass@k and maj@k.

Grading never raises: a parse error, a math-verify exception or a timeout grades the sample wrong
(after a plain numeric / string comparison had its chance).

math-verify bounds its own run time with ``signal.alarm``, which works only in the main thread; off
the main thread (e.g. ``run_eval`` called from a worker thread) it runs without that timeout, and
answers longer than ``MAX_ANSWER_CHARS`` skip math-verify altogether so a pathological string
cannot stall grading.

math-verify is optional (the ``eval`` extra: ``pip install 'sglang-er[eval]'``); without it every
comparison is the numeric / normalized-string one, which grades GSM8K's integer answers the same.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import math
import random
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

MAX_ANSWER_CHARS = 400
VERIFY_TIMEOUT_S = 5
MAX_CLUSTER_KEYS = 32  # pairwise math-verify merging of distinct answers in maj@k only up to this many

_BOX_COMMANDS = ("\\boxed", "\\fbox")

logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------
def extract_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (nested braces matched).

    Also accepts the brace-less form ``\\boxed 5``. Returns None when there is no complete box
    (e.g. a generation cut off inside the braces).
    """
    if not text:
        return None
    best = -1
    cmd = ""
    for c in _BOX_COMMANDS:
        i = text.rfind(c)
        if i > best:
            best, cmd = i, c
    while best >= 0:
        content = _box_content(text, best + len(cmd))
        if content is not None:
            return content
        # An incomplete last box: fall back to an earlier complete one.
        prev = -1
        for c in _BOX_COMMANDS:
            i = text.rfind(c, 0, best)
            if i > prev:
                prev, cmd = i, c
        best = prev
    return None


def _box_content(text: str, i: int) -> str | None:
    n = len(text)
    if i < n and text[i] == "{":
        depth = 0
        j = i
        while j < n:
            ch = text[j]
            if ch == "\\":  # a control sequence: \{ \} \\ never count as braces
                j += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
            j += 1
        return None
    if i < n and text[i] == " ":  # "\boxed 5" (a single token, TeX style)
        m = re.match(r"\s+([^\s$}]+)", text[i:])
        return m.group(1).strip() if m else None
    return None


def extract_gsm8k_reference(answer: str) -> str:
    """The final answer after ``#### `` in a GSM8K solution, thousands separators removed."""
    tail = answer.split("####")[-1].strip()
    return tail.replace(",", "").strip()


def reference_answer(raw) -> str:
    """Final reference answer from a dataset field: GSM8K ``#### n``, a solution's last box, or
    the value itself (MATH-500's ``answer``)."""
    if raw is None:
        return ""
    s = str(raw).strip()
    if "####" in s:
        return extract_gsm8k_reference(s)
    if any(c in s for c in _BOX_COMMANDS):
        boxed = extract_boxed(s)
        if boxed is not None:
            return boxed
    return s


def extract_answer(response: str | None) -> str | None:
    """The model's final answer: the last box. None when the response has none."""
    return extract_boxed(response)


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_UNIT_WORDS = re.compile(
    r"\s*(dollars?|cents?|units?|degrees?|meters?|cm|km|m|inches|inch|feet|foot|ft|hours?|minutes?|"
    r"seconds?|days?|weeks?|years?|miles?|pounds?|lbs?|kg|g|percent)\s*$",
    re.IGNORECASE,
)


def normalize_answer(s: str | None) -> str:
    """A light canonical form for string comparison and vote grouping."""
    if s is None:
        return ""
    s = s.strip()
    s = s.strip("$").strip()
    s = re.sub(r"\\[,;:! ]", "", s)  # TeX spacing
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\circ", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = _TEXT_RE.sub(r"\1", s)
    s = _UNIT_WORDS.sub("", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000 -> 1000
        s = s.replace(",", "")
    return s


_FRAC_RE = re.compile(r"^(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")


def numeric_value(s: str | None) -> float | None:
    """The number ``s`` denotes (ints, decimals, 1,000, 3/4, \\frac{3}{4}, 50\\%), or None."""
    t = normalize_answer(s)
    if not t:
        return None
    try:
        return float(t)
    except ValueError:
        pass
    m = _FRAC_RE.match(t) or re.fullmatch(r"(-?)([\d.]+)/([\d.]+)", t)
    if m:
        try:
            v = float(m.group(2)) / float(m.group(3))
            return -v if m.group(1) else v
        except (ValueError, ZeroDivisionError):
            return None
    return None


def fallback_equiv(pred: str | None, ref: str | None) -> bool:
    """Numeric comparison (relative 1e-6), else normalized string equality."""
    if pred is None or ref is None:
        return False
    a, b = numeric_value(pred), numeric_value(ref)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    na, nb = normalize_answer(pred), normalize_answer(ref)
    return bool(na) and na == nb


def _timeout() -> int | None:
    return VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=1)
def have_math_verify() -> bool:
    """Whether math-verify is installed (else grading falls back to numeric / string comparison)."""
    return importlib.util.find_spec("math_verify") is not None


@lru_cache(maxsize=65536)
def _mv_parse(s: str, timeout: int | None):
    from math_verify import parse

    s = s.strip()
    if s.startswith("$") and s.endswith("$"):
        s = s.strip("$")
    parsed = parse(f"${s}$", parsing_timeout=timeout, raise_on_error=False)
    if not parsed:
        parsed = parse(f"\\boxed{{{s}}}", parsing_timeout=timeout, raise_on_error=False)
    return tuple(parsed)


def math_verify_equiv(pred: str, ref: str) -> bool | None:
    """math-verify's verdict, or None when it cannot give one (error, timeout, unparsable)."""
    if len(pred) > MAX_ANSWER_CHARS or len(ref) > MAX_ANSWER_CHARS or not have_math_verify():
        return None
    try:
        from math_verify import verify

        timeout = _timeout()
        g, p = _mv_parse(ref, timeout), _mv_parse(pred, timeout)
        if not g or not p:
            return None
        return bool(verify(list(g), list(p), timeout_seconds=timeout, raise_on_error=False))
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None


def is_equiv(pred: str | None, ref: str | None) -> bool:
    """Whether answer ``pred`` equals reference ``ref`` (math-verify, then a numeric fallback)."""
    if pred is None or ref is None or not pred.strip() or not str(ref).strip():
        return False
    ref = str(ref)
    if pred.strip() == ref.strip():
        return True
    verdict = math_verify_equiv(pred, ref)
    if verdict:
        return True
    return fallback_equiv(pred, ref)


_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_last_number(response: str | None) -> str | None:
    """The last number in ``response`` (lm-eval's "flexible extract" for GSM8K), commas dropped."""
    nums = _NUMBER_RE.findall(response or "")
    return nums[-1].replace(",", "").rstrip(".") if nums else None


@dataclass
class Grade:
    extracted: str | None
    correct: bool
    correct_flexible: bool = False  # the box, else the last number: small models rarely box


def grade(response: str | None, reference: str) -> Grade:
    """Extract the last box of ``response`` and compare it with ``reference``. Never raises."""
    try:
        ans = extract_answer(response)
        ok = is_equiv(ans, reference)
        flex = ok if ans is not None else is_equiv(extract_last_number(response), reference)
        return Grade(ans, ok, flex)
    except Exception:  # noqa: BLE001
        return Grade(None, False)


# --------------------------------------------------------------------------------------------
# pass@k, maj@k
# --------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k), for n samples, c correct."""
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return sorted(set(ks + [n]))


def answer_clusters(answers: Sequence[str | None]) -> list[int | None]:
    """Group equivalent answers: one cluster id per answer (None for no answer).

    Answers are first keyed by their numeric value or normalized string; distinct keys are then
    merged pairwise with math-verify when there are at most ``MAX_CLUSTER_KEYS`` of them.
    """
    keys: list[str | None] = []
    for a in answers:
        if a is None or not a.strip():
            keys.append(None)
            continue
        v = numeric_value(a)
        keys.append(f"#{v:.9g}" if v is not None else normalize_answer(a) or a.strip())
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    rep = {k: answers[keys.index(k)] for k in distinct}
    parent = {k: k for k in distinct}

    def find(k):
        while parent[k] != k:
            k = parent[k]
        return k

    if len(distinct) <= MAX_CLUSTER_KEYS:
        for a, b in itertools.combinations(distinct, 2):
            if find(a) != find(b) and math_verify_equiv(rep[a], rep[b]):
                parent[find(b)] = find(a)
    ids = {k: i for i, k in enumerate(dict.fromkeys(find(k) for k in distinct))}
    return [None if k is None else ids[find(k)] for k in keys]


def majority_vote(clusters: Sequence[int | None]) -> int | None:
    """Index of the sample whose answer won the vote (ties: the answer seen first); None if no
    sample has an answer."""
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, c in enumerate(clusters):
        if c is None:
            continue
        counts[c] = counts.get(c, 0) + 1
        first.setdefault(c, i)
    if not counts:
        return None
    best = max(counts, key=lambda c: (counts[c], -first[c]))
    return first[best]


def maj_at_k(
    clusters: Sequence[int | None],
    correct: Sequence[bool],
    k: int,
    *,
    max_subsets: int = 128,
    seed: int = 0,
) -> float:
    """maj@k of one prompt: the probability that a majority vote over k of its n samples is right.

    Exact over all k-subsets when there are at most ``max_subsets`` of them, else a seeded
    Monte-Carlo average over ``max_subsets`` random subsets. The winner's correctness is that of the
    first sample in the winning answer cluster.
    """
    n = len(clusters)
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= n, got k={k}, n={n}")

    def vote(idx: Sequence[int]) -> float:
        w = majority_vote([clusters[i] for i in idx])
        return float(bool(correct[idx[w]])) if w is not None else 0.0

    if math.comb(n, k) <= max_subsets:
        subsets = list(itertools.combinations(range(n), k))
    else:
        rng = random.Random(seed)
        subsets = [sorted(rng.sample(range(n), k)) for _ in range(max_subsets)]
    return sum(vote(s) for s in subsets) / len(subsets)
