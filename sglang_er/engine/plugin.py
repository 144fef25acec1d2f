"""SGLang general plugin (entry point ``sglang.srt.plugins: sglang_er``).

Loaded by ``sglang.srt.plugins.load_plugins()`` in every SGLang process before server
arguments are parsed; everything sglang-er changes in SGLang (:mod:`.hooks`) is registered from here, so the
startup log lists it.
"""

from __future__ import annotations

import logging

from sglang_er import __version__

logger = logging.getLogger("sglang_er")


def register() -> None:
    from sglang_er.engine import hooks, registration
    from sglang_er.engine.cpu.platform import activate

    if activate() is not None:
        hooks.apply("cpu")
    registration.register()
    hooks.apply("server")
    logger.info("sglang-er %s loaded (speculative algorithm %s registered)", __version__, registration.NAME)
