"""Keep the drafter in step with the policy: re-quantize after every weight update.

SGLang routes every weight operation through ``SchedulerWeightUpdaterManager`` in the
scheduler process, between forward passes. AFTER hooks on the operations that finish an
update re-quantize every live EFFROLLOUT drafter from the target's new weights before the
scheduler runs its next iteration, so no request sees a half-updated drafter:

- ``update_weights_from_disk`` (one call loads everything);
- ``end_weight_update`` (closes a begin/end session of ``update_weights_from_tensor`` /
  ``_distributed`` / ``_ipc`` chunks; re-quantizing per chunk would waste work);
- ``resume_memory_occupation`` (weights restored after ``release_memory_occupation`` in
  colocated RL; the drafter must never silently keep stale or released weights).
"""

from __future__ import annotations

import logging

from sglang_er.engine import server_info

logger = logging.getLogger(__name__)


def after_update(result, *args, **kwargs):
    if getattr(result, "success", True):
        for worker in server_info.workers():
            worker.on_weights_updated()
    return result
