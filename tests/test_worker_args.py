"""EFFROLLOUT rejects settings it does not support, at startup, with a message naming the fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from sglang_er.config import DEFAULT_GAMMA, EffRolloutConfig
from sglang_er.engine.registration import resolve_gamma, validate_server_args
from sglang_er.launcher import free_port


class _Args:
    """The fields validate_server_args reads, with SGLang's defaults."""

    def __init__(self, **kw):
        self.speculative_draft_model_path = None
        self.speculative_eagle_topk = None
        self.speculative_num_draft_tokens = None
        self.speculative_num_steps = None
        self.pp_size = self.tp_size = self.dp_size = self.page_size = 1
        self.enable_dp_attention = False
        self.kv_cache_dtype = "auto"
        self.disable_overlap_schedule = False
        self.__dict__.update(kw)


def test_defaults_are_resolved():
    a = _Args(speculative_num_draft_tokens=6)
    validate_server_args(a)
    assert (a.speculative_num_steps, a.speculative_num_draft_tokens, a.speculative_eagle_topk) == (5, 6, 1)
    assert a.disable_overlap_schedule is False  # the overlap scheduler stays on
    sync = _Args(disable_overlap_schedule=True)
    validate_server_args(sync)
    assert sync.disable_overlap_schedule is True  # --disable-overlap-schedule is kept
    b = _Args(speculative_num_steps=2)
    validate_server_args(b)
    assert b.speculative_num_draft_tokens == 3
    assert resolve_gamma(None, None) == DEFAULT_GAMMA


@pytest.mark.parametrize(
    "kw, fix",
    [
        ({"speculative_draft_model_path": "/some/draft"}, "remove --speculative-draft-model-path"),
        ({"speculative_eagle_topk": 4}, "--speculative-eagle-topk"),
        ({"speculative_num_draft_tokens": 40}, "--speculative-num-draft-tokens between"),
        ({"speculative_num_draft_tokens": 4, "speculative_num_steps": 5}, "pass only one"),
        ({"pp_size": 2}, "remove --pp-size 2"),
        ({"enable_dp_attention": True}, "--enable-dp-attention"),
        ({"kv_cache_dtype": "fp8_e5m2"}, "--kv-cache-dtype"),
    ],
)
def test_unsupported_settings_name_the_fix(kw, fix):
    with pytest.raises(ValueError, match=fix):
        validate_server_args(_Args(**kw))


def test_tensor_parallel_is_accepted_but_not_with_history(monkeypatch):
    validate_server_args(_Args(tp_size=2))
    monkeypatch.setenv("SGLANG_ER_HISTORY", "group")
    with pytest.raises(ValueError, match="unset SGLANG_ER_HISTORY or remove --tp-size 2"):
        validate_server_args(_Args(tp_size=2))
    validate_server_args(_Args(tp_size=1))


@pytest.mark.parametrize("env, fix", [("9", "lower"), ("abc", "SGLANG_ER_GAMMA=3"), ("", None), ("0,2", None)])
def test_gamma_env(env, fix):
    if fix is None:
        EffRolloutConfig.from_env(4, {"SGLANG_ER_GAMMA": env})
    else:
        with pytest.raises(ValueError, match=fix):
            EffRolloutConfig.from_env(4, {"SGLANG_ER_GAMMA": env})


@pytest.mark.parametrize(
    "env, fix",
    [
        ({"SGLANG_ER_MIN_GAIN": "0.9"}, "SGLANG_ER_MIN_GAIN='0.9': Input should be greater than or equal to 1"),
        ({"SGLANG_ER_HYSTERESIS": "lots"}, "SGLANG_ER_HYSTERESIS='lots'"),
        ({"SGLANG_ER_MODE": "sometimes"}, "SGLANG_ER_MODE='sometimes'"),
    ],
)
def test_bad_env_names_the_variable(env, fix):
    with pytest.raises(ValueError, match=re.escape(fix)):
        EffRolloutConfig.from_env(4, env)


def test_mode_off_is_always_plain():
    cfg = EffRolloutConfig.from_env(4, {"SGLANG_ER_MODE": "off"})
    assert cfg.mode == "off" and {cfg.gamma_for_iteration(i) for i in range(5)} == {0}
    with pytest.raises(ValueError, match="SGLANG_ER_GAMMA fixes γ.*not off"):
        EffRolloutConfig.from_env(4, {"SGLANG_ER_MODE": "off", "SGLANG_ER_GAMMA": "3"})


def test_fixed_mode_keeps_its_gamma_whatever_the_batch():
    """SGLANG_ER_GAMMA fixes γ (0: plain decoding), or cycles a list per iteration: no cost model decides."""
    for env, want in (("3", [3] * 5), ("0", [0] * 5), ("3,0,1", [3, 0, 1, 3, 0])):
        cfg = EffRolloutConfig.from_env(4, {"SGLANG_ER_GAMMA": env})
        assert cfg.mode == "fixed" and [cfg.gamma_for_iteration(i) for i in range(5)] == want


def test_chooser_margins_from_env():
    cfg = EffRolloutConfig.from_env(4, {"SGLANG_ER_MIN_GAIN": "1.2", "SGLANG_ER_HYSTERESIS": "0"})
    assert (cfg.min_gain, cfg.hysteresis) == (1.2, 0.0)
    assert (EffRolloutConfig.from_env(4, {}).min_gain, EffRolloutConfig.from_env(4, {}).hysteresis) == (1.05, 0.02)


REFUSALS = [
    (["--speculative-eagle-topk", "4"], {}, "--speculative-eagle-topk"),
    ([], {"SGLANG_ER_GAMMA": "99"}, "SGLANG_ER_GAMMA"),
    ([], {"SGLANG_ER_MODE": "sometimes"}, "SGLANG_ER_MODE"),
    ([], {"SGLANG_ER_PROFILE": "CORRUPT"}, "SGLANG_ER_PROFILE"),
    ([], {"SGLANG_ER_PROFILE": "GPU"}, "was measured on 'NVIDIA H100"),
    ([], {"SGLANG_ER_HISTORY": "sometimes"}, "SGLANG_ER_HISTORY=.sometimes."),
]


@pytest.fixture(scope="module")
def refusals(tiny_model, tmp_path_factory):
    """Every refused start at once, three at a time: each is an SGLang import (~10 s of one core)
    that ends in the refusal, so running them side by side halves the module's time."""
    from concurrent.futures import ThreadPoolExecutor

    from sglang_er.gamma.builtin_profiles import builtin_profile

    tmp = tmp_path_factory.mktemp("refusals")
    bad = tmp / "profile.json"
    bad.write_text('{"schema_version": 1, "name": "x", "bandwidth_bytes_per_s": "fast"')
    # GPU: a valid profile, measured on another kind of machine
    special = {"CORRUPT": str(bad), "GPU": str(builtin_profile("h100").save(tmp / "h100.json"))}

    def launch(case):
        args, env, _ = case
        env = {k: special.get(v, v) for k, v in env.items()}
        cmd = [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            str(tiny_model),
            "--port",
            str(free_port()),
            "--max-total-tokens",
            "2048",
            "--speculative-algorithm",
            "EFFROLLOUT",
            *args,
        ]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=240, env={**os.environ, **env}, start_new_session=True
        )

    with ThreadPoolExecutor(3) as ex:
        return list(ex.map(launch, REFUSALS))


@pytest.mark.parametrize("case", range(len(REFUSALS)), ids=[c[2].split("=")[0] for c in REFUSALS])
def test_server_refuses_to_start_and_says_why(refusals, case):
    out, fix = refusals[case], REFUSALS[case][2]
    assert out.returncode != 0
    assert re.search(fix, out.stdout + out.stderr), (out.stdout + out.stderr)[-3000:]
