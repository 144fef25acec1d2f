"""The engine boundary: the only code in sglang-er that names SGLang (0.5.23).

- :mod:`.plugin`: SGLang's plugin entry point; registers everything below at process start.
- :mod:`.hooks`: the table of every hook on SGLang's code (target, kind, handler, why), applied once.
- :mod:`.registration`: the EFFROLLOUT algorithm and its server-argument checks.
- :mod:`.worker`: the speculative worker SGLang's scheduler drives, one decode iteration per call.
- :mod:`.batch`: what the worker reads off SGLang's batch and requests.
- :mod:`.model`: the target's weights and KV pool as plain views for the drafter.
- :mod:`.forwards`: the verify and plain-decode forwards, results and logprobs through SGLang.
- :mod:`.verify_input`: the verify's ``spec_info`` for backends with a TARGET_VERIFY path (GPU).
- :mod:`.spec_meta`, :mod:`.server_info`, :mod:`.weight_sync`: per-request ``meta_info``, server
  state, re-quantization after weight updates (each a hook handler).
- :mod:`.kernels`: SGLang's GPU kernels and runtime settings the product code uses.
- :mod:`.cpu`: the portable CPU platform (SGLang's torch-native paths on any CPU).

An SGLang upgrade audits this folder; ``tests/test_layout.py`` fails if any other module imports SGLang.
"""
