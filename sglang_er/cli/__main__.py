"""``python -m sglang_er.cli``: the ``sglang-er`` command."""

from sglang_er.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
