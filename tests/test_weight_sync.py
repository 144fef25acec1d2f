"""Policy updates reach the drafter: after /update_weights_from_disk the W4 copy is re-quantized
from the new weights (acceptance stays high) and the output is lossless w.r.t. the new weights."""

from __future__ import annotations

import pytest
import requests

from conftest import start_server

PROMPT = "Alice has 12 apples. She buys 7 more. How many"


def _hf_greedy(model_dir, n=40):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -n:].tolist()


@pytest.fixture(scope="module")
def policy_v2():
    from sglang_er.models.factory import build_model

    return build_model("tiny", seed=1)  # same shapes and tokenizer, new weights


def test_update_from_disk_requantizes_the_drafter(tiny_model, policy_v2):
    srv = start_server(tiny_model, ["--dtype", "float32", "--speculative-algorithm", "EFFROLLOUT",
                                    "--speculative-num-draft-tokens", "4"], env={"SGLANG_ER_GAMMA": "3"})
    try:
        before = srv.generate(PROMPT, max_new_tokens=40, temperature=0, ignore_eos=True)
        assert before["output_ids"] == _hf_greedy(tiny_model)
        r = requests.post(srv.url + "/update_weights_from_disk", json={"model_path": str(policy_v2)}, timeout=300)
        assert r.status_code == 200 and r.json()["success"], r.text
        after = srv.generate(PROMPT, max_new_tokens=40, temperature=0, ignore_eos=True)
        log = srv.log_path.read_text()
    finally:
        srv.stop()
    assert after["output_ids"] == _hf_greedy(policy_v2)
    assert "drafter re-quantized from the updated policy" in log
    # A drafter left on the old weights would agree with the new policy almost never.
    a, b = before["meta_info"]["spec_accept_rate"], after["meta_info"]["spec_accept_rate"]
    assert b > 0.5 * a and b > 0.2, (a, b)
