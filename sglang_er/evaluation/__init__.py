"""The math eval harness that ships with the package: datasets (:mod:`.math_data`, including a
packaged GSM8K sample), grading (:mod:`.grading`), the OpenAI-API client (:mod:`.client`), the run
(:mod:`.runner`) with its records, statistics and report, and the CLI (:mod:`.math_eval`,
``sglang-er eval``). The demo runs its rollouts through it.

The checkout's ``eval`` package keeps the benchmarks and re-exports some of these modules under
their old names (``eval.grading``, ``eval.math_data``, ``eval.math_eval``).
"""
