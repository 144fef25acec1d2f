"""Registration of the EFFROLLOUT speculative algorithm with SGLang.

``SpeculativeAlgorithm.register`` (SGLang 0.5.23) takes a worker factory, a server-args
validator and a ``CustomSpecAlgo`` subclass; the validator resolves EFFROLLOUT's defaults and
rejects what it does not support with one message each that names the fix.
"""

from __future__ import annotations

import os

from sglang.srt.speculative.spec_registry import CustomSpecAlgo

from sglang_er.config import DEFAULT_GAMMA, MAX_GAMMA, EffRolloutConfig

NAME = "EFFROLLOUT"


class EffRolloutAlgo(CustomSpecAlgo):
    """Duck-types the methods the scheduler calls on every speculative algorithm."""

    def has_draft_kv(self) -> bool:
        # Draft K/V only ever lands in the slots allocated for the verify pass.
        return False

    def carries_draft_hidden_states(self) -> bool:
        return False

    def need_topk(self) -> bool:
        return False

    def get_platform_worker_cls(self):
        return None

    def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens=True, needs_confidence_relay=False):
        from sglang.srt.managers.overlap_utils import FutureMap

        return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)


def resolve_gamma(num_draft_tokens, num_steps) -> int:
    if num_draft_tokens is not None and num_steps is not None and num_draft_tokens != num_steps + 1:
        raise ValueError(
            f"EFFROLLOUT drafts a chain: --speculative-num-draft-tokens ({num_draft_tokens}) must equal "
            f"--speculative-num-steps + 1 ({num_steps + 1}); pass only one of them"
        )
    gamma = (
        num_draft_tokens - 1 if num_draft_tokens is not None else num_steps if num_steps is not None else DEFAULT_GAMMA
    )
    if not 1 <= gamma <= MAX_GAMMA:
        raise ValueError(
            f"EFFROLLOUT γ = {gamma} is out of range: use --speculative-num-draft-tokens between 2 and "
            f"{MAX_GAMMA + 1} (γ + 1); for plain decoding set SGLANG_ER_GAMMA=0 or drop --speculative-algorithm"
        )
    return gamma


def validate_server_args(args) -> None:
    if args.speculative_draft_model_path:
        raise ValueError(
            "EFFROLLOUT drafts with a 4-bit copy of the target itself: remove --speculative-draft-model-path"
        )
    if args.speculative_eagle_topk not in (None, 1):
        raise ValueError("EFFROLLOUT drafts a single chain: remove --speculative-eagle-topk or set it to 1")
    if args.pp_size not in (None, 1):
        raise ValueError(
            f"EFFROLLOUT drafts with every layer of the target on each rank, which pipeline parallelism "
            f"splits across ranks: remove --pp-size {args.pp_size} (use --tp-size to split the model)"
        )
    for flag, value, ok in (
        ("--dp-size", args.dp_size, 1),
        ("--page-size", args.page_size, 1),
    ):
        if value not in (None, ok):
            raise ValueError(f"EFFROLLOUT supports {flag} {ok} only so far: remove {flag} {value}")
    if args.enable_dp_attention:
        raise ValueError(
            "EFFROLLOUT drafts on the target's tensor-parallel attention shards, which DP attention "
            "replaces with per-rank batches: remove --enable-dp-attention"
        )
    if args.kv_cache_dtype not in (None, "auto", "bfloat16", "bf16", "float32"):
        raise ValueError(
            f"EFFROLLOUT reads the target's KV cache in the model dtype: remove --kv-cache-dtype {args.kv_cache_dtype}"
        )
    gamma = resolve_gamma(args.speculative_num_draft_tokens, args.speculative_num_steps)
    config = EffRolloutConfig.from_env(gamma)  # a bad SGLANG_ER_* setting fails at startup, not mid-serving
    if config.history != "off" and (args.tp_size or 1) > 1:
        raise ValueError(
            f"EFFROLLOUT history drafts run on one rank only so far: unset SGLANG_ER_HISTORY or remove "
            f"--tp-size {args.tp_size}"
        )
    from sglang_er.gamma.hardware_profile import PROFILE_ENV, profile_from_env

    if os.environ.get(PROFILE_ENV):  # a bad or mismatched profile fails here, at startup
        profile_from_env(_server_device(args.device))
    args.speculative_num_draft_tokens = gamma + 1
    args.speculative_num_steps = gamma
    args.speculative_eagle_topk = 1
    # The overlap scheduler stays as the user set it (on by default): the worker serves SGLang's
    # V2 speculative schema with and without it (--disable-overlap-schedule).


def _server_device(device: str | None) -> str:
    """The device type this server runs on: ``--device``, else what torch sees."""
    from sglang_er.engine.cpu.platform import accelerator_present

    return (device or ("cpu" if accelerator_present() is None else "cuda")).split(":")[0].lower()


def register() -> None:
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import get_spec

    if get_spec(NAME) is not None:
        return

    @SpeculativeAlgorithm.register(
        NAME, supports_overlap=True, validate_server_args=validate_server_args, spec_class=EffRolloutAlgo
    )
    def _factory(server_args):
        from sglang_er.engine.worker import EffRolloutWorker

        return EffRolloutWorker
