"""GPU check of the W4 drafter's linears with torch alone: kernel exactness, and r(B) = T_draft / T_target.

Needs torch and ``sglang_er.quant`` only, so it runs on a bare CUDA machine without SGLang (W4Linear
then takes Marlin if SGLang's kernels import, torch's own int4 kernel otherwise; the report names it).

    python -m eval.gpu_check --out DIR            # a CUDA GPU; about a minute on an H200
    python -m eval.gpu_check --out DIR --dry-run  # a CPU, tiny shapes: proves the script, times nothing

1. Exactness: random bf16 weights of several shapes; W4Linear (the kernel chosen on this device)
   against dequantize-then-matmul in float32 (:meth:`QuantizedTensor.dequantize`). Fails beyond
   :data:`REL_TOL` / :data:`MAX_TOL`, and where a layer fell back to the dequantized ``torch`` path
   (as large and as slow as bf16, so no W4 speed to measure).
2. Timing: the linears of a decoder step (qkv, o, gate_up, down per layer, then lm_head) with the
   shapes of Qwen2.5-1.5B and -7B and random weights, at B tokens: bf16 ``F.linear`` (target) against
   W4Linear built as the drafter builds them (draft). Attention, norms and activations are left out:
   both steps pay them alike, so the real ratio lies closer to 1 than the one reported here.
   CUDA events around one step (a CUDA graph replay unless ``--no-graphs``), target and draft
   interleaved, median over ``--reps`` after warm-up. With ``--layers`` below the model's depth the
   layer stack is scaled to the full depth (T = T_stack · L / L_used + T_head), which the report says.
3. Re-quantization: what a weight update costs the drafter of each model's shape, through the
   drafter's own ``DraftLayer.requantize`` over every layer (no head: on a GPU the drafter shares the
   target's), with RTN, with AWQ's first search (whole β grid) and with its warm-started ones.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``; exit status 1 on a failed check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from eval.provenance import header, provenance
from sglang_er.draft.drafter import DraftLayer
from sglang_er.quant.awq import LINEAR_GROUPS, AWQQuantizer
from sglang_er.quant.w4linear import KERNELS, W4Linear

# bf16 wherever the kernels are: output (~0.2 %), scale and float zero (~0.5 %), and on CUDA the
# dequantized weight (~0.2 %); up to 0.8 % relative seen on the CPU kernel. A wrong zero point,
# nibble order or group layout is off by tens of percent.
REL_TOL = 2e-2  # ||y - ref|| / ||ref||, the bound W4Linear validates its kernel with
MAX_TOL = 5e-2  # max |y - ref| / max |ref|
BATCHES = (1, 2, 4, 8, 16, 32, 64)
EXACT_ROWS = (1, 7, 64)


@dataclass(frozen=True)
class Shape:
    """A decoder's linear shapes (the fields of its Hugging Face config)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    def linears(self) -> dict[str, tuple[int, int]]:
        """name -> (N out, K in) of one decoder layer's fused linears."""
        return {
            "qkv": ((self.heads + 2 * self.kv_heads) * self.head_dim, self.hidden),
            "o": (self.hidden, self.heads * self.head_dim),
            "gate_up": (2 * self.intermediate, self.hidden),
            "down": (self.hidden, self.intermediate),
        }


# From the models' public config.json (Qwen/Qwen2.5-0.5B-Instruct, -1.5B-Instruct, -7B-Instruct); 0.5B
# is the shape of the model the CPU figures are measured on.
MODELS = {
    "qwen2.5-0.5b": Shape(896, 4864, 14, 2, 64, 24, 151936),
    "qwen2.5-1.5b": Shape(1536, 8960, 12, 2, 128, 28, 151936),
    "qwen2.5-7b": Shape(3584, 18944, 28, 4, 128, 28, 152064),
}
DRY_MODELS = {"tiny": Shape(128, 384, 4, 2, 32, 4, 512)}
DRY_LAYERS = 2  # of 4: exercises the scaling to the full depth


def exactness_cases(dry: bool) -> list[tuple[str, int, int, bool]]:
    """(label, N, K, with input_scale): every linear kind, a vocab head, and Marlin's padded N."""
    if dry:
        s = DRY_MODELS["tiny"]
        lin = s.linears()
        return [(f"tiny.{k}", *v, k in ("o", "down")) for k, v in lin.items()] + [
            ("tiny.lm_head", s.vocab, s.hidden, False)
        ]
    a, b, c = MODELS["qwen2.5-1.5b"], MODELS["qwen2.5-7b"], MODELS["qwen2.5-0.5b"]
    return [
        ("qwen2.5-0.5b.qkv", *c.linears()["qkv"], False),  # the yardstick's own shape (N 1152, K 896)
        *[(f"qwen2.5-1.5b.{k}", *v, k in ("o", "down")) for k, v in a.linears().items()],
        ("qwen2.5-7b.down", *b.linears()["down"], True),
        ("qwen2.5-1.5b.lm_head", a.vocab, a.hidden, False),
        ("smollm2-135m.qkv", 960, 576, False),  # K = 576: Marlin pads N; torch's kernel takes K % 64
    ]


def _weight(n: int, k: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """bf16 [N, K] like a trained layer's: small values and a few outlier input channels."""
    w = torch.randn(n, k, generator=gen, device=device) * 0.05
    w[:, :: max(1, k // 7)] *= 8
    return w.to(torch.bfloat16)


def _errors(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    d = y.float() - ref
    rel = d.norm() / ref.norm().clamp_min(1e-12)
    return {"max_abs_err": float(d.abs().max()), "max_abs_ref": float(ref.abs().max()), "rel_err": float(rel)}


@torch.inference_mode()
def check_exactness(device: torch.device, dry: bool, kernel: str | None = None) -> list[dict]:
    """One row per (shape, M): W4Linear's output against dequantize-then-matmul in float32."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for label, n, k, scaled in exactness_cases(dry):
        w = _weight(n, k, gen, device)
        bias = None
        if label.endswith("qkv"):
            bias = (torch.randn(n, generator=gen, device=device) * 0.1).to(torch.bfloat16)
        s = torch.exp(0.3 * torch.randn(k, generator=gen, device=device)) if scaled else None
        layer = W4Linear.from_float(w, bias, input_scale=s, kernel=kernel)
        deq = layer.dequantize(torch.float32)  # [N, K] of W·diag(s)
        case = {"case": label, "n": n, "k": k, "group_size": layer.group_size, "input_scale": scaled}
        case |= {"kernel": layer.kernel, "kernel_reason": layer.kernel_reason}
        for m in EXACT_ROWS:
            x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
            xr = x.float() if s is None else (x / s).to(torch.bfloat16).float()  # the layer's own rounding
            ref = F.linear(xr, deq, None if bias is None else bias.float())
            e = _errors(layer(x), ref)
            ok = e["rel_err"] <= REL_TOL and e["max_abs_err"] <= MAX_TOL * e["max_abs_ref"] and layer.kernel != "torch"
            rows.append({**case, "m": m, **e, "ok": ok})
        del layer, deq, w
    return rows


# ----------------------------------------------------------------------------- timing
def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:  # pragma: no cover - CUDA only
    """``fn`` captured into a CUDA graph (warmed up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def median_ms(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int) -> dict[str, float]:
    """Median ms per function; the functions take turns within every rep (drift hits all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device))
    return {name: statistics.median(v) for name, v in samples.items()}


class Stack:
    """``layers`` decoder layers' linears plus an lm_head, in bf16 and as the drafter's W4Linears."""

    def __init__(self, shape: Shape, layers: int, device: torch.device, kernel: str | None = None, seed: int = 1):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.shape, self.layers = shape, layers
        self.target: list[dict[str, torch.Tensor]] = []
        self.draft: list[dict[str, W4Linear]] = []
        for _ in range(layers):
            ws = {name: _weight(n, k, gen, device) for name, (n, k) in shape.linears().items()}
            bias = torch.zeros(ws["qkv"].shape[0], dtype=torch.bfloat16, device=device)  # Qwen2's qkv bias
            self.target.append({**ws, "qkv_bias": bias})
            # as the drafter builds them: o and down keep an input scale (AWQ's, ones until calibrated)
            ones = {name: torch.ones(ws[name].shape[1], device=device) for name in ("o", "down")}
            self.draft.append(
                {
                    "qkv": W4Linear.from_float(ws["qkv"], bias, kernel=kernel),
                    "o": W4Linear.from_float(ws["o"], None, input_scale=ones["o"], kernel=kernel),
                    "gate_up": W4Linear.from_float(ws["gate_up"], kernel=kernel),
                    "down": W4Linear.from_float(ws["down"], None, input_scale=ones["down"], kernel=kernel),
                }
            )
        self.head = _weight(shape.vocab, shape.hidden, gen, device)
        self.w4_head = W4Linear.from_float(self.head, kernel=kernel)

    def kernels(self) -> dict[str, list[str]]:
        """linear name -> [kernel, reason] (the same for every layer: same shapes)."""
        out = {name: [m.kernel, m.kernel_reason] for name, m in self.draft[0].items()}
        out["lm_head"] = [self.w4_head.kernel, self.w4_head.kernel_reason]
        return out

    def steps(self, b: int) -> dict[str, Callable[[], object]]:
        """The four timed calls at ``b`` tokens: target/draft layer stack and target/draft lm_head."""
        dev = self.head.device
        xh = torch.randn(b, self.shape.hidden, device=dev).to(torch.bfloat16)  # [B, hidden]
        xi = torch.randn(b, self.shape.intermediate, device=dev).to(torch.bfloat16)  # [B, intermediate]

        def target_layers():
            for w in self.target:
                F.linear(xh, w["qkv"], w["qkv_bias"])
                F.linear(xh, w["o"])
                F.linear(xh, w["gate_up"])
                F.linear(xi, w["down"])

        def draft_layers():
            for m in self.draft:
                m["qkv"](xh)
                m["o"](xh)
                m["gate_up"](xh)
                m["down"](xi)

        return {
            "target_layers": target_layers,
            "draft_layers": draft_layers,
            "target_head": lambda: F.linear(xh, self.head),
            "draft_head": lambda: self.w4_head(xh),
        }


def step_row(b: int, ms: dict[str, float], scale: float) -> dict:
    """One B's figures; ``scale`` = real depth / layers timed."""
    target = ms["target_layers"] * scale + ms["target_head"]
    draft = ms["draft_layers"] * scale + ms["draft_head"]
    return {
        "B": b,
        **{f"{k}_ms": v for k, v in ms.items()},
        "target_step_ms": target,
        "draft_step_ms": draft,
        "r": draft / target,
        "r_layers": ms["draft_layers"] / ms["target_layers"],
        "r_head": ms["draft_head"] / ms["target_head"],
    }


@torch.inference_mode()
def time_model(shape: Shape, layers: int, device: torch.device, args, deadline: float) -> dict:
    """r(B) for one model's shapes; B values past the time budget are listed as skipped."""
    stack = Stack(shape, layers, device, args.kernel)
    res = {"shape": asdict(shape), "layers_timed": layers, "kernels": stack.kernels(), "rows": [], "skipped": []}
    for b in args.batches:
        if time.monotonic() > deadline:
            res["skipped"].append(b)
            continue
        fns = stack.steps(b)
        if args.graphs:  # pragma: no cover - CUDA only
            fns = {k: _graphed(fn) for k, fn in fns.items()}
        res["rows"].append(step_row(b, median_ms(fns, device, args.reps, args.warmup), shape.layers / layers))
        del fns
    del stack
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------- re-quantization
AWQ_TOKENS = 512  # activation rows AWQ observes per linear group before its search


def _layer_view(shape: Shape, gen: torch.Generator, device: torch.device) -> SimpleNamespace:
    """The tensors :class:`DraftLayer` reads from one target layer: random, trained-like bf16."""
    lin = shape.linears()
    ones = torch.ones(shape.hidden, dtype=torch.bfloat16, device=device)
    return SimpleNamespace(
        qkv_weight=_weight(*lin["qkv"], gen, device),
        qkv_bias=(torch.randn(lin["qkv"][0], generator=gen, device=device) * 0.1).to(torch.bfloat16),
        o_weight=_weight(*lin["o"], gen, device),
        gate_up_weight=_weight(*lin["gate_up"], gen, device),
        down_weight=_weight(*lin["down"], gen, device),
        input_norm=ones,
        post_norm=ones.clone(),
    )


def _seconds(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":  # pragma: no cover - CUDA only
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":  # pragma: no cover - CUDA only
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


@torch.inference_mode()
def time_requantize(shape: Shape, device: torch.device, reps: int) -> dict:
    """Seconds to re-quantize every layer of a drafter of this shape, as after a weight update."""
    gen = torch.Generator(device=device).manual_seed(1)
    views = [_layer_view(shape, gen, device) for _ in range(shape.layers)]
    awq = AWQQuantizer(min_tokens=AWQ_TOKENS)
    for i, v in enumerate(views):
        for group in LINEAR_GROUPS:
            k = getattr(v, f"{group}_weight").shape[1]
            for _ in range(AWQ_TOKENS // 128):  # forwards of 128 rows, as traffic feeds it
                x = torch.randn(128, k, generator=gen, device=device)
                x[:, :: max(1, k // 13)] *= 10  # a few large input channels, what AWQ protects
                awq.observe(i, group, x.to(torch.bfloat16))
    searched = sum(awq.ready(i, g) for i in range(shape.layers) for g in LINEAR_GROUPS)

    def run(layers: list[DraftLayer]) -> Callable[[], None]:
        def requantize_all() -> None:
            for layer in layers:
                layer.requantize()

        return requantize_all

    rtn = run([DraftLayer(v, i, None) for i, v in enumerate(views)])
    rtn()  # warm-up: kernels and allocator
    out = {
        "layers": shape.layers,
        "awq_groups_searched": searched,
        "rtn_s": statistics.median(_seconds(rtn, device) for _ in range(reps)),
    }
    aw = run([DraftLayer(v, i, awq) for i, v in enumerate(views)])
    out["awq_first_s"] = _seconds(aw, device)  # no earlier β: the whole grid
    # the searches after it start from the last β; every 8th scans the whole grid again
    out["awq_warm_s"] = statistics.median(_seconds(aw, device) for _ in range(reps))
    del views, awq
    if device.type == "cuda":  # pragma: no cover - CUDA only
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- report
def failures(result: dict) -> list[str]:
    """Why the check fails, one line per reason (empty: it passed)."""
    out: dict[str, None] = {}  # ordered, without repeats
    for r in result["exactness"]["rows"]:
        if r["kernel"] == "torch":
            out[f"{r['case']}: no 4-bit kernel ({r['kernel_reason']})"] = None
        elif not r["ok"]:
            line = (
                f"{r['case']} M={r['m']}: {r['kernel']} rel {r['rel_err']:.2e} (<= {REL_TOL}), "
                f"max {r['max_abs_err']:.3g} (<= {MAX_TOL} x {r['max_abs_ref']:.3g})"
            )
            out[line] = None
    for model, t in result["timing"].items():
        if "error" in t:
            out[f"{model}: timing failed ({t['error']})"] = None
            continue
        for lin, (kernel, why) in t["kernels"].items():
            if kernel == "torch":
                out[f"{model}.{lin}: no 4-bit kernel ({why})"] = None
    for model, q in result.get("requantize", {}).items():
        if "error" in q:
            out[f"{model}: re-quantization failed ({q['error']})"] = None
        elif q["awq_groups_searched"] < len(LINEAR_GROUPS) * q["layers"]:
            total = len(LINEAR_GROUPS) * q["layers"]
            out[f"{model}: AWQ searched {q['awq_groups_searched']} of {total} linear groups"] = None
    return list(out)


def markdown(result: dict) -> str:
    dry = result["dry_run"]
    lines = [
        "# W4 kernel exactness and r(B) = T_draft / T_target" + (" -- DRY RUN" if dry else ""),
        "",
        header(result["provenance"]),
        "",
    ]
    if dry:
        lines += [
            "**Dry run on the CPU with tiny shapes: the timings below mean nothing; they prove the script runs.**",
            "",
        ]
    lines += [
        f"Verdict: **{'PASS' if result['ok'] else 'FAIL'}**",
        *[f"- {f}" for f in result["failures"]],
        "",
        f"## Exactness (W4Linear vs dequantize-then-matmul in float32; rel <= {REL_TOL}, max <= {MAX_TOL} x max|ref|)",
        "",
        "| case | N x K | g | M | kernel | rel err | max err / max ref | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["exactness"]["rows"]:
        lines.append(
            f"| {r['case']} | {r['n']} x {r['k']} | {r['group_size']} | {r['m']} | {r['kernel']} | "
            f"{r['rel_err']:.2e} | {r['max_abs_err'] / r['max_abs_ref']:.2e} | {'yes' if r['ok'] else 'NO'} |"
        )
    reasons = sorted({r["kernel_reason"] for r in result["exactness"]["rows"]})
    lines += ["", "Kernel choice: " + "; ".join(reasons), ""]
    graphs = "CUDA graph replay" if result["cuda_graphs"] else "eager"
    for model, t in result["timing"].items():
        if "error" in t:
            lines += [f"## {model}: timing failed", "", t["error"], ""]
            continue
        s = t["shape"]
        scaled = "" if t["layers_timed"] == s["layers"] else f", scaled from {t['layers_timed']} timed layers"
        lines += [
            f"## {model}: hidden {s['hidden']}, intermediate {s['intermediate']}, heads {s['heads']}/{s['kv_heads']}, "
            f"{s['layers']} layers{scaled}, vocab {s['vocab']}",
            "",
            f"Linears only, random weights, {graphs}, median of {result['reps']}; kernels: "
            + ", ".join(f"{k} {v[0]}" for k, v in t["kernels"].items()),
            "",
            "| B | target ms | draft ms | r | r layers | r lm_head |",
            "|---|---|---|---|---|---|",
        ]
        for r in t["rows"]:
            lines.append(
                f"| {r['B']} | {r['target_step_ms']:.3f} | {r['draft_step_ms']:.3f} | {r['r']:.3f} | "
                f"{r['r_layers']:.3f} | {r['r_head']:.3f} |"
            )
        if t["skipped"]:
            lines.append(f"\nSkipped (time budget): B = {t['skipped']}")
        lines.append("")
    if result.get("requantize"):
        lines += [
            "## Re-quantization after a weight update",
            "",
            f"Every layer's `DraftLayer.requantize` (no head), random weights; RTN and AWQ warm: median of "
            f"{result['requantize_reps']}; AWQ first: the first search, over the whole β grid, after "
            f"{AWQ_TOKENS} observed activation rows per linear group.",
            "",
            "| model | layers | AWQ groups searched | RTN s | AWQ first s | AWQ warm s |",
            "|---|---|---|---|---|---|",
        ]
        for model, q in result["requantize"].items():
            if "error" in q:
                lines.append(f"| {model} | failed: {q['error']} | | | | |")
                continue
            lines.append(
                f"| {model} | {q['layers']} | {q['awq_groups_searched']} | {q['rtn_s']:.3f} | "
                f"{q['awq_first_s']:.3f} | {q['awq_warm_s']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(result) + "\n")


def loaded_modules() -> dict[str, list[str]]:
    """SGLang and engine modules this process loaded: a bare GPU machine has no SGLang to load.
    (``sglang_er.engine.kernels`` comes with W4Linear: it probes for Marlin lazily, importing nothing.)"""
    names = sorted(m for m, mod in sys.modules.items() if mod is not None)  # None: an import blocked
    return {
        "sglang": [m for m in names if m == "sglang" or m.startswith(("sglang.", "sgl_kernel"))],
        "sglang_er.engine": [m for m in names if m.startswith("sglang_er.engine")],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few reps: timings mean nothing")
    p.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS), help="default: all")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--layers", type=int, default=None, help="layers timed per model (default: its full depth)")
    p.add_argument("--reps", type=int, default=None, help="timed reps per B (default 30; dry run 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; dry run 1)")
    p.add_argument("--kernel", choices=KERNELS, default=None, help="force a W4 kernel (default: W4Linear's choice)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="time eager calls, not CUDA graphs")
    p.add_argument("--budget-s", type=float, default=200.0, help="stop timing new B values after this long")
    p.add_argument(
        "--requantize-reps", type=int, default=None, help="re-quantizations timed per model, 0: none (default 5; dry 1)"
    )
    args = p.parse_args(argv)
    args.reps = args.reps or (3 if args.dry_run else 30)
    args.warmup = args.warmup or (1 if args.dry_run else 5)
    if args.requantize_reps is None:
        args.requantize_reps = 1 if args.dry_run else 5
    if args.dry_run:
        args.graphs = False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    t0 = time.monotonic()
    if args.dry_run:
        device, models = torch.device("cpu"), DRY_MODELS
    elif torch.cuda.is_available():
        device, models = torch.device("cuda"), {m: MODELS[m] for m in (args.models or MODELS)}
    else:
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "provenance": provenance(
            ", ".join(models) + " (layer shapes, random weights)",
            argv=["gpu_check", *argv],
            device=dev_name,
            torch=torch.__version__,
        ),
        "dry_run": args.dry_run,
        "timings_meaningful": not args.dry_run,
        "device": dev_name,
        "torch": torch.__version__,
        "cuda_graphs": args.graphs,
        "reps": args.reps,
        "warmup": args.warmup,
        "tolerance": {"rel_err": REL_TOL, "max_abs_err_over_max_ref": MAX_TOL},
        "kernel_forced": args.kernel,
        "exactness": {"rows": check_exactness(device, args.dry_run, args.kernel)},
        "timing": {},
    }
    result["exactness"]["ok"] = all(r["ok"] for r in result["exactness"]["rows"])
    result["failures"] = failures(result)
    result["ok"] = not result["failures"]
    write(args.out, result)  # the exactness verdict survives a timing crash
    deadline = t0 + args.budget_s
    for name, shape in models.items():
        layers = min(shape.layers, args.layers or (DRY_LAYERS if args.dry_run else shape.layers))
        try:
            result["timing"][name] = time_model(shape, layers, device, args, deadline)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: keep the other model's figures
            result["timing"][name] = {"error": f"{type(e).__name__}: {e}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write(args.out, {**result, "failures": failures(result)})
    result["requantize"], result["requantize_reps"] = {}, args.requantize_reps
    for name, shape in models.items() if args.requantize_reps else ():
        try:
            result["requantize"][name] = time_requantize(shape, device, args.requantize_reps)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: keep the other figures
            result["requantize"][name] = {"error": f"{type(e).__name__}: {e}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["failures"] = failures(result)
    result["ok"] = not result["failures"]
    result["imports"] = loaded_modules()
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    write(args.out, result)
    print(markdown(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
