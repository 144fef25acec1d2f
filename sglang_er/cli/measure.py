"""The measurement half of ``sglang-er calibrate``: one real EFFROLLOUT server, a grid of batch
sizes and prompt lengths, and the per-iteration timeline it records.

The server runs with ``SGLANG_ER_GAMMA=0,g1,g2,..`` (γ cycles per iteration, 0 = a plain decode
step), so T_T, T_D and T_V are measured side by side at the same batch; B concurrent greedy
requests of S random tokens per (B, S); the timeline comes from ``/get_server_info``. Only the
full-batch iterations after warm-up are kept.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sglang_er.cli.sweep import MODES, SweepRow


@dataclass
class Measurement:
    """Full-batch timeline records per (batch, seq) config, after warm-up."""

    records: dict[tuple[int, int], list[dict]] = field(default_factory=dict)
    attention_backend: str | None = None
    device: str = ""
    base_name: str = "cpu"
    dropped_records: int = 0  # records the server's timeline buffer lost (should be 0)


def _device_and_base() -> tuple[str, str]:
    """This machine's device name and its built-in profile (the base of what a sweep cannot fit)."""
    from sglang_er.engine.cpu.platform import accelerator_present
    from sglang_er.gamma.builtin_profiles import builtin_profile_for_device

    if accelerator_present() == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        return name, builtin_profile_for_device(name, warn=False).name
    return f"cpu-{os.cpu_count()}core", "cpu"


def _timeline(srv) -> tuple[list[dict], dict]:
    import requests

    r = requests.get(srv.url + "/get_server_info", timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"GET /get_server_info -> {r.status_code}: {r.text[:300]}")
    info = r.json()
    try:
        states = info["internal_states"]
        tl = next(s["effrollout"]["timeline"] for s in states if isinstance(s, dict) and "effrollout" in s)
    except (KeyError, TypeError, StopIteration):
        raise RuntimeError(
            "the server's /get_server_info has no internal_states[..].effrollout.timeline; "
            "is it an EFFROLLOUT server of this sglang-er version?"
        ) from None
    return tl, info


def measure(
    model_path,
    config: dict,
    *,
    batch_sizes: list[int],
    seq_lens: list[int],
    gammas: list[int],
    max_new_tokens: int,
    kv_tokens: int | None = None,
    warmup: int = 2,
    seed: int = 0,
    server_args: Iterable[str] = (),
    log: Callable[[str], None] = print,
) -> Measurement:
    """Run the sweep against one real EFFROLLOUT server (always stopped on return)."""
    from sglang_er.gamma.builtin_profiles import GENERIC_GPU
    from sglang_er.launcher import DEFAULT_MAX_TOTAL_TOKENS, Server

    device, base_name = _device_and_base()
    if base_name == GENERIC_GPU:
        log(
            f"note: no built-in profile for {device}: what the sweep cannot determine comes from the "
            "uncalibrated generic-gpu placeholder"
        )
    gmax = max(gammas)
    need = max(batch_sizes) * (max(seq_lens) + max_new_tokens + gmax + 8)
    kv = kv_tokens or max(DEFAULT_MAX_TOTAL_TOKENS, int(need * 1.25))
    if kv < need:
        raise ValueError(f"--kv-tokens {kv} is below the {need} KV tokens the largest config needs; raise it")
    vocab = int(config.get("vocab_size") or 0)
    if vocab < 2:
        raise ValueError("model config has no usable vocab_size")
    cycle = ",".join(str(g) for g in [0, *gammas])
    env = {"SGLANG_ER_GAMMA": cycle, "SGLANG_ER_TIMELINE": str(max(1024, 4 * max_new_tokens + 64))}
    args = [
        "--speculative-algorithm",
        "EFFROLLOUT",
        "--speculative-num-steps",
        str(gmax),
        "--max-running-requests",
        str(max(max(batch_sizes), 8)),
        *server_args,
    ]
    rng = random.Random(seed)
    out = Measurement(device=device, base_name=base_name)
    log(f"starting an EFFROLLOUT server on {model_path} (γ cycle {cycle}, KV {kv} tokens) ...")
    t0 = time.monotonic()
    with Server(model_path, args, env=env, max_total_tokens=kv, stop_grace=1.0) as srv:
        log(f"server up in {time.monotonic() - t0:.0f}s; log {srv.log_path}")

        def run(B: int, S: int) -> None:
            ids = [[rng.randrange(vocab) for _ in range(S)] for _ in range(B)]
            srv.post(
                "/generate",
                {
                    "input_ids": ids,
                    "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
                },
                timeout=1800,
            )

        run(1, min(seq_lens))  # warm-up (not recorded): first-call allocations, lazy imports
        tl, info = _timeline(srv)
        out.attention_backend = info.get("decode_attention_backend") or info.get("attention_backend")
        last = max((r["iteration"] for r in tl), default=0)
        for B in batch_sizes:
            for S in seq_lens:
                run(B, S)
                tl, _ = _timeline(srv)
                new = {r["iteration"]: r for r in tl if r["iteration"] > last}
                if new:
                    lo, hi = min(new), max(new)
                    out.dropped_records += lo - last - 1
                    last = hi
                full = [new[i] for i in sorted(new) if new[i]["batch_size"] == B][warmup:]
                out.records[(B, S)] = full
                by_g = defaultdict(int)
                for r in full:
                    by_g[r["gamma"]] += 1
                log(
                    f"  B={B:<3} S={S:<5} {len(full):3d} full-batch iterations "
                    + " ".join(f"γ{g}:{by_g[g]}" for g in [0, *gammas])
                )
    if out.dropped_records:
        log(f"warning: the server's timeline dropped {out.dropped_records} iteration records")
    return out


def _pos(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) and x > 0 else None


def measurement_samples(cost, m: Measurement, gammas: list[int]) -> tuple[list, list[tuple[int, int]]]:
    """Per-iteration calibration samples with each request's committed length, and the (batch,
    seq) configuration of each (for the held-out split)."""
    out, keys = [], []
    for key, recs in m.records.items():
        for r in recs:
            g, lens = r["gamma"], r["seq_lens"]
            phases = [("plain", "plain_s")] if g == 0 else [("draft", "draft_s"), ("verify", "verify_s")]
            if g != 0 and g not in gammas:
                continue
            for phase, col in phases:
                if _pos(r.get(col)):
                    out.append(cost.calibration_sample(phase, lens, g, r[col]))
                    keys.append(key)
    return out, keys


def measurement_rows(m: Measurement, gammas: list[int]) -> list[SweepRow]:
    """Medians per (batch, seq, γ, mode); drafter_decode per drafter step."""
    rows = []
    for (B, S), recs in sorted(m.records.items()):
        vals: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
        for r in recs:
            g, lens = r["gamma"], r["seq_lens"]
            ctx = sum(lens) / len(lens)
            if g == 0 and _pos(r.get("plain_s")):
                vals[(0, "target_decode")].append((r["plain_s"], ctx))
            elif g in gammas:
                if _pos(r.get("draft_s")):
                    vals[(g, "drafter_decode")].append((r["draft_s"] / g, ctx))
                if _pos(r.get("verify_s")):
                    vals[(g, "target_verify")].append((r["verify_s"], ctx))
        for (g, mode), v in sorted(vals.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]))):
            rows.append(
                SweepRow(B, S, g, mode, statistics.median(x[0] for x in v) * 1e3, len(v), sum(x[1] for x in v) / len(v))
            )
    return rows
