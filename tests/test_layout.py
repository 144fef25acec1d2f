"""The engine boundary: only ``sglang_er/engine/`` names SGLang, and every hook it installs resolves.

An SGLang upgrade then means auditing one folder: the hook table (:mod:`sglang_er.engine.hooks`),
the worker and the readers beside it.
"""

from __future__ import annotations

import ast
import inspect
import pkgutil
from pathlib import Path

import pytest

import sglang_er
from sglang_er.engine import hooks

PACKAGE = Path(sglang_er.__file__).parent
SGLANG_PREFIXES = ("sglang.srt", "sglang.kernels", "sglang.launch_server")


def sglang_references(root: Path, allowed: tuple[str, ...] = ("engine",)) -> list[str]:
    """``path:line what`` for every import of SGLang (or dotted SGLang path in a string, as hook
    targets are written) in a module under ``root`` outside the ``allowed`` subpackages."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value] if node.value.startswith(SGLANG_PREFIXES) and " " not in node.value else []
            for name in names:
                if name == "sglang" or name.startswith(("sglang.", "sgl_kernel")):
                    found.append(f"{rel}:{node.lineno} {name}")
    return found


def test_only_the_engine_names_sglang():
    # launcher.py starts `python -m sglang.launch_server`: a command line, not SGLang's internals
    bad = [r for r in sglang_references(PACKAGE) if not r.startswith("launcher.py") or "launch_server" not in r]
    assert not bad, "outside sglang_er/engine/: " + ", ".join(bad)


def test_the_check_catches_an_import_and_a_hook_target(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "ok.py").write_text("import sglang.srt.utils\n")
    (tmp_path / "a.py").write_text("from sglang.srt.managers import schedule_batch\n")
    (tmp_path / "b.py").write_text('T = "sglang.srt.managers.tokenizer_manager.TokenizerManager.x"\n')
    (tmp_path / "c.py").write_text('"""Mentions sglang.srt in prose only."""\nimport sglang_er\n')
    assert sglang_references(tmp_path) == [
        "a.py:1 sglang.srt.managers",
        "b.py:1 sglang.srt.managers.tokenizer_manager.TokenizerManager.x",
    ]


@pytest.mark.parametrize("hook", hooks.HOOKS, ids=lambda h: ".".join(h.target.rsplit(".", 2)[-2:]))
def test_every_hook_target_and_handler_resolves(hook):
    """HookRegistry only logs a target it cannot resolve: a renamed SGLang function fails here."""
    assert hook.kind in ("after", "replace", "around") and hook.group in ("server", "cpu") and hook.why
    target = pkgutil.resolve_name(hook.target)
    handler = pkgutil.resolve_name(hook.handler)
    assert callable(target) and callable(handler)
    if hook.kind == "replace":  # same call shape as what it replaces
        names = [p.name for p in inspect.signature(inspect.unwrap(target)).parameters.values()]
        assert [p.name for p in inspect.signature(handler).parameters.values()] == names
