"""Moved to :mod:`sglang_er.evaluation.grading` (it ships with the package); this name stays for the
checkout's benchmarks and tests. The module object is the package's own, so attributes set or
monkeypatched through either name are the same."""

import sys

from sglang_er.evaluation import grading as _impl

sys.modules[__name__] = _impl
