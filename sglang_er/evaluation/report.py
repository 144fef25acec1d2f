"""The summary as the table the CLI prints."""

from __future__ import annotations

from sglang_er.evaluation.records import Summary


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(s: Summary) -> str:
    rows: list[tuple[str, str]] = [
        ("model", s.model),
        ("dataset", s.dataset),
        ("endpoint", f"{s.api} {s.endpoint}"),
        ("problems x n", f"{s.num_problems} x {s.n} = {s.num_samples} samples"),
        ("errors", str(s.num_errors)),
        ("boxed answers", f"{s.num_extracted}/{s.num_samples}"),
        (f"accuracy (mean@{s.n})", _fmt(s.accuracy)),
        ("accuracy, last number if no box", _fmt(s.accuracy_flexible)),
        *[(k, _fmt(v)) for k, v in s.pass_at_k.items()],
        *[(k, _fmt(v)) for k, v in s.maj_at_k.items()],
        (
            "latency p50/p90/p99 s",
            f"{_fmt(s.latency_s.p50, 3)} / {_fmt(s.latency_s.p90, 3)} / {_fmt(s.latency_s.p99, 3)}",
        ),
        ("makespan s", _fmt(s.makespan_s, 2)),
        ("output tokens", str(s.output_tokens)),
        ("output tok/s", _fmt(s.output_tokens_per_s, 1)),
        ("mean output tokens", _fmt(s.mean_output_tokens, 1)),
        ("finish reasons", ", ".join(f"{k}={v}" for k, v in sorted(s.finish_reasons.items())) or "-"),
    ]
    a = s.acceptance
    if a is not None:
        rows += [
            (
                "spec accept length",
                f"{_fmt(a.accept_length, 3)} tok/step (mean/request {_fmt(a.mean_sample_accept_length, 3)})",
            ),
            ("spec accept rate", f"{_fmt(a.accept_rate, 3)} ({a.num_correct_drafts}/{a.num_proposed_drafts} drafts)"),
            ("spec verify steps", str(a.verify_ct)),
            ("spec accepted-drafts hist", " ".join(map(str, a.correct_drafts_histogram)) or "-"),
        ]
    else:
        rows.append(("spec acceptance", "not reported by the server"))
    if s.out_dir:
        rows.append(("output", s.out_dir))
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{w}}  {v}" for k, v in rows), line])
