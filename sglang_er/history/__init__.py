"""History drafts: proposals from a prompt's other samples and earlier epochs (off by default).

- :mod:`.store`: the suffix index of past token streams.
- :mod:`.proposer`: per iteration, which requests take history drafts and how they merge with the W4 drafter's.
"""
