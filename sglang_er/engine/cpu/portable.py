"""The portable CPU platform class (see :mod:`sglang_er.engine.cpu.platform` for when it activates)."""

from __future__ import annotations

import logging

from sglang.srt.platforms.cpu import CpuSRTPlatform
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities

from sglang_er.engine.cpu.platform import SUPPORTED_SPECULATIVE_ALGORITHMS, TORCH_ATTENTION_BACKENDS

logger = logging.getLogger(__name__)


class PortableCpuPlatform(CpuSRTPlatform):
    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    capabilities = PlatformCapabilities()  # no Triton, no graph capture, no pynccl

    def get_default_attention_backend(self) -> str:
        return "torch_native"

    def get_dispatch_key_name(self) -> str:
        return "native"

    def apply_server_args_defaults(self, server_args) -> None:
        if getattr(server_args, "attention_backend", None) in (None, "intel_amx"):
            server_args.attention_backend = "torch_native"
        for field in ("prefill_attention_backend", "decode_attention_backend"):
            if getattr(server_args, field, None) == "intel_amx":
                setattr(server_args, field, "torch_native")
        if getattr(server_args, "sampling_backend", None) in (None, "flashinfer"):
            server_args.sampling_backend = "pytorch"
        # An idle scheduler busy-polls its sockets; on a CPU that core is the compute.
        server_args.sleep_on_idle = True

    def supports_speculative_algorithm(self, algorithm: str) -> bool:
        return str(algorithm).upper() in SUPPORTED_SPECULATIVE_ALGORITHMS

    def supports_speculative_draft_attention_backend(self, algorithm: str, backend: str) -> bool:
        return self.supports_speculative_algorithm(algorithm) and backend in TORCH_ATTENTION_BACKENDS

    def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
        return "torch_native"

    def init_backend(self) -> None:
        from sglang_er.engine import hooks

        hooks.apply("cpu")
        logger.info("sglang-er portable CPU platform active (torch-native paths)")
