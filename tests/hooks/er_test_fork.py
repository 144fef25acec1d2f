"""Test servers fork SGLang's scheduler and detokenizer instead of spawning them
(``sglang_er.launcher.fork_children``): a forked child starts with SGLang already imported, about
25 s of a tiny test server's 55 s start on 2 cores. Every server the suite starts does this
(``conftest.py`` puts ``tests/hooks`` on the path, so product commands run in process are
covered too), except those of ``test_startup_errors.py``, which start as the product does.
"""

from __future__ import annotations

import os


def install() -> None:
    if os.environ.get("SGLANG_ER_TEST_FORK") == "1":
        from sglang_er.launcher import fork_children

        fork_children()
