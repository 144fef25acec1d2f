"""SGLang general plugin (entry point ``sglang.srt.plugins: sglang_er``).

Loaded by ``sglang.srt.plugins.load_plugins()`` in every SGLang process before server
arguments are parsed; everything sglang-er changes in SGLang is registered from here, so
the startup log lists it.
"""

from __future__ import annotations

import logging

from sglang_er import __version__

logger = logging.getLogger("sglang_er")


def register() -> None:
    from sglang_er import algorithm, server_info, spec_meta, weight_sync
    from sglang_er.platform import activate

    if activate() is not None:
        from sglang_er import cpu_ops

        cpu_ops.install()
    algorithm.register()
    weight_sync.install()
    server_info.install()
    spec_meta.install()
    logger.info("sglang-er %s loaded (speculative algorithm %s registered)", __version__, algorithm.NAME)
