"""Benchmarks and tools of the source checkout (not installed with the package).

The checkout's datasets live in ``../shared/data`` beside the repository: importing ``eval`` points
``SGLANG_ER_DATA`` there unless it is set already, so ``gsm8k``, ``math500`` and the ``gsm8k-lm``
model's training data resolve as they always did. The installed package reads data only from
``SGLANG_ER_DATA`` (and its own packaged GSM8K sample).
"""

import os
from pathlib import Path

CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

if not os.environ.get("SGLANG_ER_DATA") and CHECKOUT_DATA.is_dir():
    os.environ["SGLANG_ER_DATA"] = str(CHECKOUT_DATA)
