"""Shared fixtures: models built from code and one real SGLang server per configuration.

Plain helper functions and constants live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

import pytest
from helpers import FP32, FaultSwitch, greedy_all, start_server, tiny_prompts

from eval import CHECKOUT_DATA

# Keep test servers and helpers on the portable CPU platform and small.
os.environ.setdefault("SGLANG_ER_CACHE", os.path.expanduser("~/.cache/sglang-er"))
# GSM8K / MATH-500 (and gsm8k-lm's training data) come from the checkout's ../shared/data; the
# installed package reads data only from SGLANG_ER_DATA.
if CHECKOUT_DATA.is_dir():
    os.environ.setdefault("SGLANG_ER_DATA", str(CHECKOUT_DATA))


@pytest.fixture(scope="session")
def tiny_model():
    from sglang_er.models.factory import build_model

    return build_model("tiny")


@pytest.fixture(scope="session")
def plain(tiny_model):
    """The reference: a plain SGLang server on the tiny model, shared by every module."""
    srv = start_server(tiny_model, FP32)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def eff3(tiny_model):
    """EFFROLLOUT at a fixed γ = 3 on the tiny model, shared by every module. Its planted wrong
    acceptance rule (``eff3.faults.planted(...)``) is off except inside a detection test."""
    srv = start_server(
        tiny_model,
        [*FP32, "--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", "4"],
        env={"SGLANG_ER_GAMMA": "3"},
        faults=FaultSwitch(),
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def plain_greedy(plain):
    prompts = tiny_prompts()
    return prompts, greedy_all(plain, prompts)
