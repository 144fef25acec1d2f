"""``python -m sglang_er.cli``: the ``sglang-er`` command."""

from sglang_er.cli import main

raise SystemExit(main())
