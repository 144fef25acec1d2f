"""Portable CPU platform: SGLang on a CPU through its torch-native paths.

- :mod:`.platform`: entry point ``sglang.srt.platforms``; decides whether to take over.
- :mod:`.portable`: the platform class (SGLang's CPU platform without its sgl-kernel requirements).
- :mod:`.ops`: torch replacements for the kernels SGLang's CPU path lacks (hooked in :mod:`..hooks`).
"""

# SGLang resolves its platform (importing :mod:`.portable`) while ``sglang`` itself initialises:
# start that first, so that importing :mod:`.portable` directly does not meet it half-built.
import sglang  # noqa: E402, F401
