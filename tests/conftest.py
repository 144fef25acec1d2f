"""Shared fixtures: models built from code and one real SGLang server per configuration."""

from __future__ import annotations

import os

import pytest

# Keep test servers and helpers on the portable CPU platform and small.
os.environ.setdefault("SGLANG_ER_CACHE", os.path.expanduser("~/.cache/sglang-er"))


@pytest.fixture(scope="session")
def tiny_model():
    from sglang_er.models.factory import build_model

    return build_model("tiny")


def start_server(model_path, extra_args=(), **kw):
    """Start a server; the caller's fixture stops it (process group kill) when the module ends."""
    from sglang_er.launcher import Server

    return Server(model_path, list(extra_args), **kw).start()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the registry package, converted once into the default cache."""
    from sglang_er.models import realmodel
    from sglang_er.models.factory import build_model

    try:
        return build_model("smollm2-135m-instruct")
    except realmodel.SourceUnavailable as e:
        pytest.skip(f"SmolLM2 source unavailable: {e}")
