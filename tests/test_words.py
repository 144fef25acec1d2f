"""The project speaks of the product only: no trace of how the work was organised.

README, CHANGELOG, docs/, result file names and every file under sglang_er/ and eval/ must not
mention numbered work periods, issue numbers or commit hashes in prose.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# "session 12", "issue 9", "issue #9", "work period 3", "stop 22"; result names like "-s13" or "-final"
FORBIDDEN = re.compile(r"\b(sessions?|issues?|work periods?|stops?)\s*#?\d+\b|\bcommit [0-9a-f]{7,40}\b", re.I)
RESULT_NAME = re.compile(r"-s\d+\b|-(final|before|after|followup)\b")


def _files():
    yield from (ROOT / p for p in ("README.md", "CHANGELOG.md") if (ROOT / p).exists())
    for folder in ("docs", "sglang_er", "eval"):
        for p in sorted((ROOT / folder).rglob("*")):
            if p.is_file() and p.suffix in (".md", ".py", ".txt", ".toml", ".json", ".cfg") and "out" not in p.parts:
                yield p


def offences(text: str) -> list[str]:
    return [m.group(0) for m in FORBIDDEN.finditer(text)]


def test_the_pattern_catches_what_it_should():
    assert offences("as measured in session 13 (issue 9), see commit 2f95679") == [
        "session 13",
        "issue 9",
        "commit 2f95679",
    ]
    assert not offences("one session of the server; an issue with the KV pool; stop the server")


@pytest.mark.parametrize("path", list(_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_work_history_in_the_product(path):
    found = offences(path.read_text(encoding="utf-8", errors="replace"))
    assert not found, f"{path.relative_to(ROOT)} mentions {found[:5]}: say what the product does instead"


def test_result_names_describe_the_run_not_when_it_ran():
    results = ROOT / "eval" / "results"
    bad = [p.name for p in results.rglob("*") if p.is_file() and RESULT_NAME.search(p.stem)] if results.exists() else []
    assert not bad, f"result files named after a work period or revision: {bad}"
