"""Soak: mixed load with periodic weight updates for a fixed time (not a CI test).

    python -m eval.soak [--model tiny] [--minutes 10] [--concurrency 24] [--update-every 30]

One EFFROLLOUT server (auto mode). Clients send a mix of greedy, sampled, ``n=4``, streaming
and logprob requests without pause; every ``--update-every`` seconds the weights are pushed
again (alternating ``update_weights_from_tensor`` and ``_from_disk`` between two policies of
the same shape, inside ``/pause_generation`` (retract) … ``/continue_generation``, as RL
frameworks do). Reports: requests served, errors, resident memory of the server's process
tree after warm-up and at the end, KV tokens in use once idle, re-quantizations. Exit code 1
on any error, a leak of KV tokens, or resident memory grown by more than ``--rss-tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import requests

from sglang_er.launcher import Server
from sglang_er.models.factory import build_model

PROMPTS = [
    "Alice has 12 apples. She buys 7 more. How many",
    "Solve for x: 3x + 5 = 20.",
    "A train travels 60 km in 1.5 hours. Its speed is",
    "The sum of the first 10 odd numbers is",
]


def tree_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the server's process group (MiB)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            with open(f"/proc/{entry}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def one_request(srv: Server, i: int) -> None:
    p = f"{PROMPTS[i % len(PROMPTS)]} ({i})"
    kind = i % 5
    if kind == 0:
        srv.generate(p, max_new_tokens=48, temperature=0, ignore_eos=True, timeout=300)
    elif kind == 1:
        srv.generate(p, max_new_tokens=64, temperature=1.0, top_p=0.9, timeout=300)
    elif kind == 2:
        srv.post("/v1/completions", {"model": "m", "prompt": p, "n": 4, "max_tokens": 32, "temperature": 1.0})
    elif kind == 3:
        with requests.post(
            srv.url + "/v1/completions",
            stream=True,
            timeout=300,
            json={"model": "m", "prompt": p, "max_tokens": 48, "stream": True},
        ) as r:
            r.raise_for_status()
            for _ in r.iter_lines():
                pass
    else:
        srv.post(
            "/generate",
            {"text": p, "return_logprob": True, "sampling_params": {"max_new_tokens": 24, "temperature": 0.7}},
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--update-every", type=float, default=30.0, help="seconds between weight updates")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    ap.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS growth after warm-up")
    ap.add_argument("--out", default="eval/out/soak.json")
    args = ap.parse_args(argv)

    from safetensors.torch import load_file

    policies = [Path(build_model(args.model)), Path(build_model(args.model, seed=1))]
    tensors = [list(load_file(str(p / "model.safetensors")).items()) for p in policies]
    stop = threading.Event()
    served, errors, counter = [0], [], iter(range(10**9))
    lock = threading.Lock()

    with Server(
        policies[0],
        ["--speculative-algorithm", "EFFROLLOUT", "--enable-metrics"],
        env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"},
    ) as srv:
        pgid = os.getpgid(srv.proc.pid)

        def client():
            while not stop.is_set():
                with lock:
                    i = next(counter)
                try:
                    one_request(srv, i)
                    with lock:
                        served[0] += 1
                except Exception as e:  # noqa: BLE001 - a soak counts failures, it does not stop
                    with lock:
                        errors.append(f"{time.strftime('%H:%M:%S')} request {i}: {e!r}"[:300])

        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        rss_start = rss_peak = None
        updates, next_update, step = [], t0 + args.update_every, 0
        while (now := time.monotonic()) - t0 < args.minutes * 60:
            if rss_start is None and now - t0 >= args.warmup:
                rss_start = tree_rss_mb(pgid)
            if rss_start is not None:
                rss_peak = max(rss_peak or 0.0, tree_rss_mb(pgid))
            if now >= next_update:
                step += 1
                w = step % 2
                t_u = time.perf_counter()
                try:
                    with srv.generation_paused():  # how RL frameworks update under load
                        if step % 4 in (1, 2):
                            srv.update_weights_from_tensor(tensors[w])
                        else:
                            srv.update_weights_from_disk(policies[w])
                    updates.append(round(time.perf_counter() - t_u, 3))
                except Exception as e:  # noqa: BLE001
                    errors.append(f"update {step}: {e!r}"[:300])
                next_update = now + args.update_every
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=300)
        rss_end = tree_rss_mb(pgid)
        deadline = time.monotonic() + 60
        while (load := srv.loads())["num_running_reqs"] + load["num_waiting_reqs"] and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)
        load = srv.loads()
        state = srv.effrollout_state() or {}
        healthy = requests.get(srv.url + "/health", timeout=30).status_code == 200

    report = {
        "model": args.model,
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "requests_served": served[0],
        "errors": len(errors),
        "first_errors": errors[:5],
        "weight_updates": len(updates),
        "update_call_s": updates,
        "requantizations": state.get("requantizations"),
        "last_requantize_s": state.get("last_requantize_s"),
        "rss_mb_after_warmup": rss_start,
        "rss_mb_peak": rss_peak,
        "rss_mb_end": rss_end,
        "kv_tokens_used_when_idle": load["num_used_tokens"],
        "healthy_at_end": healthy,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    grew = rss_start and rss_end > rss_start * (1 + args.rss_tolerance)
    ok = not errors and load["num_used_tokens"] == 0 and healthy and not grew
    print("soak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
