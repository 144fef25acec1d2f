"""The self-drafter: a W4 copy of the target that drafts from the target's own KV cache.

- :mod:`.drafter`: the drafter's layers and its draft step (no KV cache of its own).
- :mod:`.views`: the target's weights and KV pool as the drafter sees them (engine-free dataclasses).
- :mod:`.vocab`: the draft head's vocabulary subset, chosen from the server's own traffic.
- :mod:`.kv_rows`: reading KV pool rows (shared with the CPU attention).
"""
