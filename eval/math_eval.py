"""Moved to :mod:`sglang_er.evaluation.math_eval` (it ships with the package); this name stays for the
checkout's benchmarks and tests, and ``python -m eval.math_eval`` still runs it. The module object is the
package's own, so attributes set or monkeypatched through either name are the same."""

import sys

from sglang_er.evaluation import math_eval as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
sys.modules[__name__] = _impl
