"""Would history drafts pay on this model? Their acceptance offline, without a server (not a test).

    python -m eval.history_probe [--model gsm8k-lm] [--prompts 6] [--n 8] [--epochs 2] [--out F.json]

Samples ``n`` responses per GSM8K prompt for ``epochs`` epochs at temperature 1 with transformers
(float32), and replays them through :class:`sglang_er.history.store.HistoryIndex` the way a rollout
feeds it: the prompt, the earlier epochs' finished responses, and the siblings in lockstep (at step
t every sample of the epoch has its first t tokens indexed). At every step of every sample it asks
the index for a proposal of up to γ tokens and scores it exactly against the target: a one-hot
proposal h is accepted at position k with probability p_k(h_k) given h_1..h_{k-1}, so its expected
accepted length is E[L] = Σ_k Π_{j≤k} p_j(h_j) (what the rejection sampler would commit, bonus token
not counted). Positions are scored on the sample's own KV cache, cropped to the step.

Printed per class of proposal (votes: how many indexed continuations agree with the first proposed
token): proposals, the share of steps with one, p(h_1), E[L], and E[L] of the proposal cut where
fewer than two continuations agree. The W4 drafter's E[L] at γ is the comparison: a history
draft replaces it only where it commits more, and a verify-only iteration of history drafts pays
only where E[L] + 1 tokens per verify beat the W4 iteration's tokens per second.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch


def expected_accepted(probs: list[float]) -> float:
    """Σ_k Π_{j≤k} p_j: the expected accepted length of a one-hot chain."""
    total, run = 0.0, 1.0
    for p in probs:
        run *= p
        total += run
    return total


def agreed_prefix(votes: list[int]) -> int:
    """Tokens of a proposal that at least two indexed continuations agree on."""
    k = 0
    while k < len(votes) and votes[k] >= 2:
        k += 1
    return k


class Scorer:
    """p_k(h_k | context, h_<k) for proposals made at every step of one sampled response."""

    def __init__(self, model, ids: list[int]):
        from transformers.cache_utils import DynamicCache

        self.model, self._cache_cls = model, DynamicCache
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
        self.probs = torch.softmax(out.logits[0].float(), -1)  # [T, V]: row i predicts token i + 1
        self.kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def __call__(self, prefix_len: int, h: list[int]) -> list[float]:
        """Probabilities of proposal h after the first ``prefix_len`` tokens of the sequence."""
        first = float(self.probs[prefix_len - 1, h[0]])
        if len(h) == 1:
            return [first]
        cache = self._cache_cls([(k[:, :, :prefix_len], v[:, :, :prefix_len]) for k, v in self.kv])
        with torch.no_grad():
            logits = self.model(torch.tensor([h[:-1]]), past_key_values=cache, use_cache=True).logits[0]
        rest = torch.softmax(logits.float(), -1)
        return [first] + [float(rest[k, h[k + 1]]) for k in range(len(h) - 1)]


def probe_prompt(model, ids: list[int], args, key: int) -> tuple[list[dict], int]:
    """(proposal records, decode steps) of one prompt's epochs."""
    from sglang_er.history.store import HistoryIndex

    index = HistoryIndex(min_match=args.min_match)
    index.group(key, ids)
    eos = model.config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)  # some configs list several
    records, steps = [], 0
    for epoch in range(args.epochs):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids] * args.n),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_tokens,
                pad_token_id=eos[0],
            )
        samples = [_until_eos(row, eos) for row in out[:, len(ids) :].tolist()]
        scorers = [Scorer(model, ids + s) for s in samples]
        for t in range(max(len(s) for s in samples)):
            for i, s in enumerate(samples):  # lockstep: every sibling's first t tokens are indexed
                have = index.stream_len(key, (epoch, i))
                index.extend(key, (epoch, i), s[have : min(t, len(s))])
            for i, s in enumerate(samples):
                if t >= len(s) - 1:
                    continue
                steps += 1
                context = (ids + s[:t])[-64:]
                p = index.propose(key, (epoch, i), context, args.gamma)
                if p is not None:
                    records.append(
                        {
                            "epoch": epoch,
                            "step": t,
                            "match_len": p.match_len,
                            "votes": p.votes,
                            "support": p.support,
                            "source": p.source,
                            "p": scorers[i](len(ids) + t, p.tokens),
                        }
                    )
        for i, s in enumerate(samples):
            index.extend(key, (epoch, i), s[index.stream_len(key, (epoch, i)) :])
        print(f"  prompt {key} epoch {epoch}: lengths {sorted(len(s) for s in samples)}", flush=True)
    return records, steps


def _until_eos(row: list[int], eos: list[int]) -> list[int]:
    """A generated row up to and including its first EOS (generate pads after it)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def summarize(records: list[dict], steps: int) -> dict:
    classes = defaultdict(list)
    for r in records:
        classes[("agreed" if r["votes"][0] >= 2 else "single", r["epoch"])].append(r)
    out = {"steps": steps, "proposals": len(records), "classes": {}}
    for (kind, epoch), rs in sorted(classes.items()):
        cut = [expected_accepted(r["p"][: agreed_prefix(r["votes"])]) for r in rs]
        out["classes"][f"{kind} epoch {epoch}"] = {
            "proposals": len(rs),
            "share_of_steps": len(rs) / max(1, steps),
            "mean_len": sum(len(r["p"]) for r in rs) / len(rs),
            "p_first": sum(r["p"][0] for r in rs) / len(rs),
            "expected_accepted": sum(expected_accepted(r["p"]) for r in rs) / len(rs),
            "expected_accepted_agreed_prefix": sum(cut) / len(rs),
        }
    return out


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.rollout_bench import chat_prompts
    from sglang_er.models.factory import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gsm8k-lm", help="built-in model name")
    p.add_argument("--model-path", default=None, help="a local HF model directory (overrides --model)")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--gamma", type=int, default=7)
    p.add_argument("--min-match", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the records and the summary as JSON")
    args = p.parse_args(argv)
    path = Path(args.model_path) if args.model_path else build_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    records, steps = [], 0
    for key, messages in enumerate(chat_prompts(path, args.prompts)[0]):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        recs, n = probe_prompt(model, tok(text, add_special_tokens=False).input_ids, args, key)
        records, steps = records + recs, steps + n
    summary = summarize(records, steps)
    print(f"{summary['proposals']} proposals over {summary['steps']} decode steps (γ = {args.gamma})")
    print(f"{'class':<18}{'proposals':>10}{'of steps':>10}{'len':>6}{'p(h1)':>8}{'E[L]':>7}{'E[L] agreed':>13}")
    for name, c in summary["classes"].items():
        print(
            f"{name:<18}{c['proposals']:>10}{c['share_of_steps']:>10.1%}{c['mean_len']:>6.1f}"
            f"{c['p_first']:>8.3f}{c['expected_accepted']:>7.2f}{c['expected_accepted_agreed_prefix']:>13.2f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary, "records": records}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
