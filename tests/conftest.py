"""Shared fixtures: models built from code and one real SGLang server per configuration.

Plain helper functions and constants live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

import pytest
from helpers import FP32, HOOKS_ENV, FaultSwitch, greedy_all, start_servers, tiny_prompts

from eval import CHECKOUT_DATA

# Keep test servers and helpers on the portable CPU platform and small.
os.environ.setdefault("SGLANG_ER_CACHE", os.path.expanduser("~/.cache/sglang-er"))
# GSM8K / MATH-500 (and gsm8k-lm's training data) come from the checkout's ../shared/data; the
# installed package reads data only from SGLANG_ER_DATA.
if CHECKOUT_DATA.is_dir():
    os.environ.setdefault("SGLANG_ER_DATA", str(CHECKOUT_DATA))
# Every server the suite starts (fixtures, and the product's own commands run in process) forks its
# scheduler; test_startup_errors.py starts servers as the product does (helpers.SPAWN_ENV).
os.environ.update(HOOKS_ENV)


@pytest.fixture(scope="session")
def tiny_model():
    from sglang_er.models.factory import build_model

    return build_model("tiny")


@pytest.fixture(scope="session")
def tiny_servers(tiny_model):
    """The two servers most modules use, started side by side: ``plain`` and ``eff3``."""
    eff3 = [*FP32, "--speculative-algorithm", "EFFROLLOUT", "--speculative-num-draft-tokens", "4"]
    pair = start_servers(
        (tiny_model, FP32), (tiny_model, eff3, {"env": {"SGLANG_ER_GAMMA": "3"}, "faults": FaultSwitch()})
    )
    yield pair
    for srv in pair:
        srv.stop()


@pytest.fixture(scope="session")
def plain(tiny_servers):
    """The reference: a plain SGLang server on the tiny model, shared by every module."""
    return tiny_servers[0]


@pytest.fixture(scope="session")
def eff3(tiny_servers):
    """EFFROLLOUT at a fixed γ = 3 on the tiny model, shared by every module. Its planted wrong
    acceptance rule (``eff3.faults.planted(...)``) is off except inside a detection test."""
    return tiny_servers[1]


@pytest.fixture(scope="session")
def plain_greedy(plain):
    prompts = tiny_prompts()
    return prompts, greedy_all(plain, prompts)


@pytest.fixture(scope="module")
def qwen():
    """The cost of a Qwen2.5-0.5B-shaped model (engine-free γ tests)."""
    from gamma_helpers import QWEN2_05B

    from sglang_er.gamma import ModelCost

    return ModelCost.from_config(QWEN2_05B)
