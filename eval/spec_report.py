"""What :mod:`eval.bench_spec` reports: ratios against plain per round, the physical bound of each
fixed γ, auto against the best other configuration, TP N against TP 1, and the markdown table; and
the results file it writes after every cell (so a crash mid-sweep keeps what was measured)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sglang_er.gamma import expected_lengths

# Configurations that choose γ per iteration; "auto-twin" (--twin) is a second, identical auto server
POLICIES = ("auto", "hybrid", "auto-twin")


def is_policy(name: str) -> bool:
    """auto, hybrid, auto's twin or auto at another γ max (``auto/gmax8``), at any TP size (``auto/tp2``)."""
    return name.split("/tp")[0] in POLICIES or name.startswith("auto/gmax")


def best_other(results: dict, names: list[str], temp: float, b: int) -> tuple[str, float]:
    """The configuration auto is judged against at (T, B): the fastest that is neither a policy
    (auto, hybrid, auto's twin) nor the γ = 0 timing server, and its tok/s."""
    others = {n: results[(n, temp, b)]["tok_s"] for n in names if not is_policy(n) and n != "gamma=0"}
    best = max(others, key=others.get)
    return best, others[best]


def paired_ratio(
    results: dict, names: list[str], temp: float, b: int, of: str = "auto", against: str | None = None
) -> float | None:
    """Median over interleaved rounds of ``of``'s tok/s over the best other configuration's in
    the same round (or ``against``'s): this machine's speed drifts by 10-15% over minutes, the
    same for every server, so a ratio within one round is steadier than a ratio of medians.
    Configurations measured once (the contender rule) are left out; None with under 3 rounds."""
    mine = results[(of, temp, b)].get("tok_s_runs") or []
    pool = [against] if against else [n for n in names if not is_policy(n) and n not in ("gamma=0", of)]
    runs = [results[(n, temp, b)].get("tok_s_runs") or [] for n in pool]
    runs = [r for r in runs if len(r) >= len(mine)]
    if len(mine) < 3 or not runs:
        return None
    return statistics.median(m / max(r[i] for r in runs) for i, m in enumerate(mine))


def markdown_table(results: dict, names: list[str], temp: float, batches: list[int]) -> str:
    """One README table: plain tok/s, then each configuration's speed-up over plain with its
    acceptance; for auto also the ratio to the best other configuration and its speculating share."""
    cols = [n for n in names if n not in ("plain", "gamma=0")]
    head = (
        "| B | plain tok/s | " + " | ".join(cols) + (" | auto vs best | auto speculating |" if "auto" in cols else " |")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for b in batches:
        base = results[("plain", temp, b)]["tok_s"]
        cells = []
        for n in cols:
            r = results[(n, temp, b)]
            acc = f" (α {r['accept_rate']:.2f})" if r.get("accept_rate") is not None else ""
            cells.append(f"{r['tok_s'] / base:.2f}x{acc}")
        row = f"| {b} | {base:.1f} | " + " | ".join(cells) + " |"
        if "auto" in cols:
            a = results[("auto", temp, b)]
            paired = paired_ratio(results, names, temp, b)
            row += (
                f" {a['tok_s'] / best_other(results, names, temp, b)[1]:.2f}x"
                + (f" ({paired:.2f}x per round)" if paired else "")
                + f" | {(a['spec_share'] or 0) * 100:.0f}% |"
            )
        lines.append(row)
    return "\n".join(lines)


def physics_bound(r: dict, t_t: float | None, gamma: int) -> float | None:
    """E[L|γ] / (γ·r + v): the speed-up over the worker's own plain step that a fixed γ reaches
    with no overhead beyond its draft steps and verify, from the cell's measured per-position
    acceptance α_k, r = T_D/T_T and v = T_V/T_T. The gap to the measured speed-up is what the
    scheduler, sampling and the acceptance bookkeeping cost."""
    alphas = r.get("position_acceptance") or []
    if (
        not gamma
        or not t_t
        or not r.get("t_draft_step")
        or not r.get("t_verify")
        or len(alphas) < gamma
        or any(a is None for a in alphas[:gamma])
    ):
        return None
    e_len = expected_lengths(alphas[:gamma])[gamma]
    return e_len / (gamma * r["t_draft_step"] / t_t + r["t_verify"] / t_t)


def round_ratios(results: dict, name: str, temp: float, b: int, base: str = "plain") -> list[float]:
    """``name``'s tok/s over ``base``'s in each interleaved round (the spread of a ratio)."""
    mine, theirs = results[(name, temp, b)].get("tok_s_runs") or [], results[(base, temp, b)].get("tok_s_runs") or []
    return [m / t for m, t in zip(mine, theirs)]


def dump(path, results: dict, model_errors: dict, meta: dict | None = None) -> None:
    """Write the results so far (after every cell, so a crash mid-sweep keeps what was measured)."""
    if path:
        with open(path, "w") as f:
            json.dump(
                {
                    **({"meta": meta} if meta else {}),
                    **{f"{k[0]}|{k[1]}|{k[2]}": v for k, v in results.items()},
                    **{f"{k}|model_error": v for k, v in model_errors.items()},
                },
                f,
                indent=1,
            )


def load(path) -> tuple[dict, dict]:
    """The results and cost-model errors :func:`dump` wrote."""
    raw = json.loads(Path(path).read_text())
    results, errors = {}, {}
    for key, v in raw.items():
        parts = key.split("|")
        if len(parts) == 3:
            results[(parts[0], float(parts[1]), int(parts[2]))] = v
        elif len(parts) == 2 and parts[1] == "model_error":
            errors[parts[0]] = v
    return results, errors


def report(
    args: argparse.Namespace, results: dict, model_errors: dict, configs: list, spec_configs: list, eos_mode: str
) -> None:
    """Print the report, write the results (``--json``) and the markdown report beside them."""
    lines: list[str] = []

    def say(text: str = "", **_print_kw) -> None:  # printed, and kept for the markdown report
        print(text, flush=True)
        lines.append(text)

    say(
        f"\nratios vs plain ({args.model}, {eos_mode}, same run; per-round range in brackets; "
        "bound = E[L|γ]/(γ·r + v) from the measured α_k, r = T_D/T_T, v = T_V/T_T)"
    )
    for temp in args.temperatures:
        for b in args.batches:
            base = results[("plain", temp, b)]["tok_s"]
            t_t = results.get(("gamma=0", temp, b), {}).get("t_plain")
            cells = []
            for name in [c[0] for c in spec_configs]:
                r = results[(name, temp, b)]
                # r and v need T_T, which only the γ = 0 server times (not run with --skip-gamma0),
                # and a draft step and a verify, which a config that never speculated did not run
                phases = r["t_draft_step"] and r["t_verify"] and t_t
                ratios = f"r {r['t_draft_step'] / t_t:.2f}, v {r['t_verify'] / t_t:.2f}, " if phases else ""
                gamma = next(c[1] for c in spec_configs if c[0] == name)
                bound = physics_bound(r, t_t, gamma)
                rr = round_ratios(results, name, temp, b)
                cells.append(
                    f"{name}: {r['tok_s'] / base:4.2f}x"
                    + (f" [{min(rr):.2f}-{max(rr):.2f}]" if len(rr) > 1 else "")
                    + f" ({ratios}α {r['accept_rate'] or 0:.2f}"
                    + (f", L {r['accept_length']:.2f}" if r.get("accept_length") else "")
                    + (f", bound {bound:.2f}x" if bound else "")
                    + (f", {r['tokens_past_eos']} of {r['tokens']} tokens past EOS" if args.ignore_eos else "")
                    + ")"
                )
            say(f"T={temp:g} B={b:3d}  " + "\n              ".join(cells))
    tp_names = [c[0] for c in configs if "/tp" in c[0]]
    # TP N against TP 1 for each configuration, then each configuration against plain at its TP size
    for title, pairs in (
        ("TP N vs TP 1, the same configuration", [(n, n.rsplit("/tp", 1)[0]) for n in tp_names]),
        (
            "vs plain at the same TP size",
            [(n, "plain/tp" + n.rsplit("/tp", 1)[1]) for n in tp_names if not n.startswith("plain")],
        ),
    ):
        if not pairs:
            continue
        say(f"\n{title} (median of the per-round ratios, range in brackets)")
        for temp in args.temperatures:
            for b in args.batches:
                cells = []
                for name, base in pairs:
                    rr = round_ratios(results, name, temp, b, base=base)
                    if rr:
                        cells.append(f"{name} vs {base}: {statistics.median(rr):4.2f}x [{min(rr):.2f}-{max(rr):.2f}]")
                say(f"T={temp:g} B={b:3d}  " + "\n              ".join(cells))
    if args.auto:
        fixed = any(not is_policy(c[0]) for c in spec_configs)  # without a fixed γ, no crossover
        say("\nauto policy vs the best other configuration (same run)")
        for temp in args.temperatures:
            crossover = max(
                (
                    b
                    for b in args.batches
                    if any(
                        results[(c[0], temp, b)]["tok_s"] > results[("plain", temp, b)]["tok_s"]
                        for c in spec_configs
                        if not is_policy(c[0])
                    )
                ),
                default=None,
            )
            for b in args.batches:
                best, best_tok_s = best_other(results, [c[0] for c in configs], temp, b)
                a = results[("auto", temp, b)]
                paired = paired_ratio(results, [c[0] for c in configs], temp, b)
                say(
                    f"T={temp:g} B={b:3d}  auto {a['tok_s']:7.1f} tok/s = {a['tok_s'] / best_tok_s:4.2f}x best "
                    f"({best}), {a['tok_s'] / results[('plain', temp, b)]['tok_s']:4.2f}x plain, speculating in "
                    f"{(a['spec_share'] or 0) * 100:.0f}% of iterations"
                    + (f"; per round {paired:4.2f}x the round's best" if paired else ""),
                    flush=True,
                )
                rivals = [("hybrid", "auto (W4 only)"), ("auto-twin", "auto (same configuration)")] + [
                    (c[0], "auto") for c in configs if c[0].startswith("auto/gmax")
                ]
                for other, label in rivals:
                    if other in [c[0] for c in configs]:
                        h = results[(other, temp, b)]
                        hp = paired_ratio(results, [c[0] for c in configs], temp, b, of=other, against="auto")
                        say(
                            f"              {other} {h['tok_s']:7.1f} tok/s = {h['tok_s'] / a['tok_s']:4.2f}x {label}"
                            + (f"; per round {hp:4.2f}x" if hp else ""),
                            flush=True,
                        )
            if fixed and crossover is None:
                say(f"T={temp:g} crossover: no fixed γ beat plain at B = {', '.join(map(str, args.batches))}")
            elif fixed:
                say(f"T={temp:g} crossover: fixed γ beats plain up to B = {crossover}")
    for temp in args.temperatures:
        say(
            f"\nT={temp:g}, speed-up over plain (acceptance α):\n"
            + markdown_table(results, [c[0] for c in configs], temp, args.batches),
            flush=True,
        )
    dump(args.json, results, model_errors, args.meta)
    if args.json:  # the report a person reads, beside the data
        from eval.provenance import header

        md = Path(args.json).with_suffix(".md")
        md.write_text(
            f"# B sweep: EFFROLLOUT vs plain SGLang\n\n{header(args.meta)}\n\n```\n" + "\n".join(lines) + "\n```\n"
        )
