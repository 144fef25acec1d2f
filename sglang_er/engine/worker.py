"""EFFROLLOUT speculative worker: draft γ tokens with the W4 self-drafter, verify losslessly.

One decode iteration, for a batch whose committed prefix (tokens with KV) has length
``seq_lens`` [B] and whose last sampled token x0 [B] has no KV yet:

1. draft: γ drafter steps at positions seq_lens .. seq_lens+γ-1, each sampled with the
   request's own sampling parameters, keeping q; the drafter reads the committed KV and keeps
   its own tokens' K/V in per-iteration buffers (:class:`sglang_er.draft.drafter.DraftAttention`);
2. verify: one target forward over [x0, d1..dγ] writing the target's K/V into the slots the
   scheduler allocated for this iteration (``req_to_token[req, seq_lens + j]``);
3. accept: exact rejection sampling (:func:`sglang_er.sampler.verify`); the scheduler then
   commits ``accept_len + 1`` tokens per request (``new_seq_lens``) and trims stop strings,
   EOS and max_new_tokens inside the accepted run.

γ = 0 is a plain SGLang decode step (its sampler, its logprobs); γ may change every iteration
at no cost because the drafter holds no state between iterations.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

from sglang_er import sampler
from sglang_er.config import EffRolloutConfig
from sglang_er.draft.drafter import Drafter
from sglang_er.draft.vocab import DraftVocab
from sglang_er.engine import batch as batch_view
from sglang_er.engine import forwards, model, server_info, spec_meta
from sglang_er.gamma.controller import Controller
from sglang_er.history.proposer import HISTORY_SOURCES, HistoryDrafts, merge_q, merge_tokens
from sglang_er.metrics import SpecMetrics, Timeline
from sglang_er.quant.awq import AWQQuantizer
from sglang_er.quant.live_stats import LiveStats

logger = logging.getLogger(__name__)
IDLE_GAP_S = 0.25  # time outside the forwards beyond this (and beyond the forwards') is idling


class EffRolloutWorker(BaseSpecWorker):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        super().__init__()
        self.server_args = server_args
        self._target_worker = target_worker
        self.model_runner = target_worker.model_runner
        self.device = torch.device(self.model_runner.device)
        self.speculative_num_steps, self.speculative_num_draft_tokens = forwards.spec_settings()
        self.topk = 1
        self.config = EffRolloutConfig.from_env(self.speculative_num_steps)
        self.metrics = SpecMetrics(self.speculative_num_steps)
        self.timeline = Timeline(self.config.timeline_size)
        self.iteration = 0
        self._last_record, self._entered = None, 0.0
        self._kv = None
        view = model.model_view(self.model_runner.model)
        self.awq = self.live_stats = None
        if self.config.quant == "awq":
            self.awq = AWQQuantizer(min_tokens=self.config.awq_min_tokens, device=self.device)
            self.live_stats = LiveStats(view, self.awq, self.config.awq_sample_every)
        self.awq_active = False
        self.drafter = Drafter(
            view, head=self.config.resolved_head(self.device.type, view.lm_head_weight.dtype), awq=self.awq
        )
        self.vocab = None
        if 0 < self.config.draft_vocab < view.vocab_size:
            self.vocab = DraftVocab(view.vocab_size, self.config.draft_vocab, self.device)
            self.drafter.set_vocab(self.vocab.select())
        self.requantizations = 0
        self.last_requantize_s = None
        server_info.track(self)
        self.history = None
        if self.config.history != "off":
            self.history = HistoryDrafts(
                self.speculative_num_steps,
                self.config.history_min_match,
                self.config.history_budget,
                include_finished=self.config.history == "all",
            )
        self.controller = None
        if self.config.mode == "auto":
            self.controller = Controller(
                self.model_runner.model_config.hf_config.to_dict(),
                self.speculative_num_steps,
                self.device,
                forwards.attention_backend_name(self.model_runner),
                self.drafter.head_kind,
                draft_vocab=self.vocab.k if self.vocab is not None else 0,
                min_gain=self.config.min_gain,
                hysteresis=self.config.hysteresis,
                explore_every=self.config.explore_every,
            )
        logger.info(
            "EFFROLLOUT drafter ready: %d layers, W4 weights %.1f MB, γ max %d, schedule %s",
            len(self.drafter.layers),
            self.drafter.weight_bytes() / 2**20,
            self.speculative_num_steps,
            self.config.gamma_schedule or "fixed",
        )

    @property
    def draft_worker(self):
        return None  # the drafter is not an SGLang model runner and owns no KV

    def weight_update_runners(self):
        return []

    def on_weights_updated(self) -> None:
        """Called by :mod:`sglang_er.engine.weight_sync` after each completed weight update."""
        self._kv = None  # a memory resume may have re-created the KV pool's buffers
        if not self.config.requantize:  # test-only switch: shows what a stale drafter costs
            logger.warning("EFFROLLOUT drafter NOT re-quantized (SGLANG_ER_REQUANTIZE=0)")
            return
        t0 = time.perf_counter()
        self.drafter.requantize(model.model_view(self.model_runner.model))
        self.requantizations += 1
        self.last_requantize_s = time.perf_counter() - t0
        if self.controller is not None:
            self.controller.drafter_changed()  # acceptance measured on the old policy's drafter
        self.metrics.record_requantize(self.last_requantize_s)
        logger.info(
            "EFFROLLOUT drafter re-quantized from the updated policy in %.3f s (#%d)",
            self.last_requantize_s,
            self.requantizations,
        )

    def state(self) -> dict:
        """What ``/get_server_info`` reports under ``internal_states[i]["effrollout"]``."""
        out = {
            "mode": self.config.mode,
            "gamma_max": self.speculative_num_steps,
            "draft_head": self.drafter.head_kind,
            "quantizer": self._quantizer_state(),
            "drafter_weight_bytes": self.drafter.weight_bytes(),
            "requantizations": self.requantizations,
            "last_requantize_s": self.last_requantize_s,
            "metrics": self.metrics.snapshot(),
            "timeline": self.timeline.snapshot(),
        }
        if self.controller is not None:
            out["policy"] = self.controller.state()
        if self.history is not None:
            out["history"] = {"mode": self.config.history, **self.history.state()}
        if self.vocab is not None:
            v = self.vocab
            out["draft_vocab"] = {
                "size": v.k,
                "selections": v.selections,
                "tokens_counted": v.seen,
                "coverage": v.coverage(self.drafter.vocab),
            }
        return out

    def _quantizer_state(self) -> dict:
        if self.awq is None:
            return {"kind": "rtn"}
        return {
            "kind": "awq",
            "active": self.awq_active,
            "tokens_observed": self.live_stats.tokens(),
            "min_tokens": self.config.awq_min_tokens,
            "forwards_sampled": self.live_stats.sampled,
            **self.drafter.awq_summary(),
        }

    def _maybe_activate_awq(self) -> bool:
        """Cold start ends: once every linear has enough live statistics, re-quantize with AWQ
        (after that, every weight update re-runs the search against the same statistics).
        Returns whether it did so now."""
        if self.awq is None or self.awq_active or not self.live_stats.ready(len(self.drafter.layers)):
            return False
        t0 = time.perf_counter()
        self.drafter.requantize()
        self.awq_active = True
        if self.controller is not None:
            self.controller.drafter_changed()  # acceptance measured on the RTN drafter
        s = self.drafter.awq_summary()
        logger.info(
            "EFFROLLOUT drafter switched from RTN to AWQ after %d observed tokens in %.3f s "
            "(%d of %d linear groups scaled, mean β %.2f)",
            self.live_stats.tokens(),
            time.perf_counter() - t0,
            s["awq_groups"],
            s["groups"],
            s["mean_beta"],
        )
        return True

    def alloc_memory_pool(self, **kwargs):
        self.req_to_token_pool, self.token_to_kv_pool_allocator = self._target_worker.get_memory_pool()

    # ------------------------------------------------------------------ scheduling entry
    def forward_batch_generation(self, batch, on_publish=None, pp_proxy_tensors=None):
        entered = time.perf_counter()
        if not batch.forward_mode.is_decode():
            self._last_record = None
            return self._prefill(batch)
        self._close_iteration(entered)
        self._entered = entered
        if self._maybe_activate_awq() | self._maybe_refresh_vocab():
            # one-time work: not the scheduler's per-iteration cost (a 0.17 s switch counted as
            # "outside" time taught the policy that speculating costs 170 ms more per iteration)
            self._entered = time.perf_counter()
        # committed lengths before the forwards rebind batch.seq_lens (host copy: no device sync)
        self._seq_list = batch_view.seq_lens_host(batch)
        logits_only = batch_view.logits_only_features(batch)
        gamma = self._choose_gamma(batch, logits_only)
        plan = self._history_plan(batch, gamma, logits_only)
        self.iteration += 1
        if plan is not None:
            result = self._speculate(batch, plan.gamma, plan)
        else:
            result = self._plain_decode(batch) if gamma == 0 else self._speculate(batch, gamma)
        if on_publish is not None:
            on_publish(result.new_seq_lens)
        return result

    def _close_iteration(self, now: float) -> None:
        """The previous decode iteration's wall time, entry to entry: its forwards plus what the
        scheduler spent around them (result processing, token streaming, KV bookkeeping), which
        grows with the tokens an iteration commits and so is part of speculation's price."""
        rec, self._last_record = self._last_record, None
        if rec is None:
            return
        wall = now - self._entered
        busy = rec["plain_s"] if rec["gamma"] == 0 else (rec["draft_s"] or 0.0) + rec["verify_s"]
        if wall - busy > max(IDLE_GAP_S, busy):  # the scheduler idled: not an iteration's cost
            return
        rec["wall_s"] = wall
        if self.controller is not None:
            self.controller.observe_outside(rec["gamma"], rec["batch_size"], max(0.0, wall - busy))

    def _choose_gamma(self, batch, logits_only: bool) -> int:
        if logits_only:
            return 0
        if self.controller is not None:
            return self.controller.choose(self._seq_list, batch_view.rids(batch), lambda: batch_view.prompt_keys(batch))
        return self.config.gamma_for_iteration(self.iteration)

    def _history_plan(self, batch, gamma: int, logits_only: bool):
        """History drafts for this iteration (see :mod:`sglang_er.history.proposer`), or None."""
        if self.history is None:
            return None
        self.history.sync(batch.reqs)  # every iteration, so the index never misses tokens
        if logits_only or (self.controller is None and gamma == 0):
            return None
        ctl = self.controller
        return self.history.plan(
            batch.reqs, gamma, ctl.w4_expected_tokens() if ctl else None, ctl.verify_only_gain if ctl else None
        )

    def _maybe_refresh_vocab(self) -> bool:
        """Re-select the draft head's vocabulary once enough new tokens were counted."""
        if self.vocab is None or not self.vocab.due():
            return False
        self.drafter.set_vocab(self.vocab.select())
        return True

    def _prefill(self, batch):
        with self._observed():
            res = self._target_worker.forward_batch_generation(batch)
        if self.vocab is not None:  # the prompts: what the answers will be written in
            self.vocab.observe(batch.input_ids)
        bs = len(batch.reqs)
        return forwards.generation_result(
            logits_output=res.logits_output,
            next_token_ids=res.next_token_ids,
            can_run_cuda_graph=res.can_run_cuda_graph,
            accept_lens=torch.ones(bs, dtype=torch.int32, device=self.device),
            new_seq_lens=batch.seq_lens,
            next_draft_input=None,
            speculative_num_draft_tokens=1,
        )

    def _observed(self):
        """A target forward whose linear inputs may feed the AWQ statistics."""
        return self.live_stats.window() if self.live_stats is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ γ = 0
    def _plain_decode(self, batch):
        bs = len(batch.reqs)
        seq_lens = batch.seq_lens
        x0 = batch_view.last_tokens(batch, self.device)
        want_logprob = batch.return_logprob  # decode_forward clears it on the batch
        clock = _Clock(self.device)
        res = forwards.decode_forward(
            self._target_worker,
            batch,
            x0,
            batch_view.slots(self.req_to_token_pool.req_to_token, batch, 1)[:, 0],
            seq_lens,
        )
        if self.vocab is not None:
            self.vocab.observe(res.next_token_ids)
        if want_logprob:
            forwards.spec_logprobs(batch, res.logits_output, res.next_token_ids, 1)
        t_plain = clock.lap()
        if self.controller:
            self.controller.observe(0, {"plain": t_plain})
        self.metrics.record(0, None, bs, {"plain": (t_plain, 1)})
        self._log_iteration(batch, res.logits_output, 0, [1] * bs, plain_s=t_plain)
        return forwards.generation_result(
            logits_output=res.logits_output,
            next_token_ids=res.next_token_ids,
            can_run_cuda_graph=res.can_run_cuda_graph,
            accept_lens=torch.ones(bs, dtype=torch.int32, device=self.device),
            new_seq_lens=seq_lens + 1,
            next_draft_input=None,
            speculative_num_draft_tokens=1,
        )

    # ------------------------------------------------------------------ γ ≥ 1
    def _speculate(self, batch, gamma: int, plan=None):
        """One draft-verify iteration; ``plan``: history drafts for some or all rows."""
        if self._kv is None:
            self._kv = model.kv_view(self.model_runner)
        bs = len(batch.reqs)
        width = gamma + 1
        seq_lens = batch.seq_lens.to(torch.int64)
        seq_dtype = batch.seq_lens.dtype
        want_logprob = batch.return_logprob  # verify_forward clears it on the batch
        params = sampler.SamplingParamsTensor.from_sampling_info(batch.sampling_info)
        greedy = params.is_all_greedy

        x0 = batch_view.last_tokens(batch, self.device)
        slots = batch_view.slots(self.req_to_token_pool.req_to_token, batch, width)  # [B, γ+1]
        kv_index = batch_view.committed_slots(self.req_to_token_pool.req_to_token, batch, max(self._seq_list))

        clock = _Clock(self.device)
        tokens, drafts, qs = x0, [], []
        run_drafter = plan is None or plan.run_drafter
        attn = self.drafter.attention(self._kv, kv_index, seq_lens, gamma) if run_drafter else None
        t_first = None
        for j in range(gamma if run_drafter else 0):
            if j == 1:  # the first step also gathers the committed KV (CostModel.observe_draft_setup)
                t_first = clock.lap()
            logits = self.drafter.step(tokens, seq_lens + j, j, attn)
            if greedy:
                tokens = logits.argmax(-1)
            else:
                q = sampler.target_probs(logits, params)
                tokens = sampler.sample(q)
                qs.append(q)
            drafts.append(tokens)
        draft_tokens = torch.stack(drafts, 1) if drafts else None  # [B, γ]
        if plan is not None:
            draft_tokens = merge_tokens(plan, x0, draft_tokens)
        t_rest = clock.lap()
        draft_split = None if t_first is None else (t_first, t_rest)
        t_draft = t_rest if t_first is None else t_first + t_rest

        verify_ids = torch.cat([x0[:, None], draft_tokens], 1)
        with self._observed():
            logits_output = forwards.verify_forward(
                self._target_worker, batch, verify_ids.flatten(), slots.flatten(), seq_lens, width
            )
        target_logits = logits_output.next_token_logits.view(bs, width, -1)
        p = None
        if greedy:
            accept_len, out_tokens = sampler.verify_greedy(draft_tokens, target_logits)
        else:
            p = sampler.target_probs(target_logits, params)
            q = torch.stack(qs, 1) if qs else None
            if plan is not None:
                q = merge_q(plan, draft_tokens, q, p.shape[-1])
            accept_len, out_tokens = sampler.verify(draft_tokens, q, p)
        # the acceptance test belongs to the verify phase, as sampling belongs to the plain step
        t_verify = clock.lap()
        if self.history is not None and self.history.shadow:  # unused proposals, measured for free
            self.history.observe_shadow(draft_tokens, p, target_logits.argmax(-1) if greedy else None)
        if self.config.inject_fault is not None:
            accept_len, out_tokens = self._inject_fault(
                plan, draft_tokens, target_logits, params, accept_len, out_tokens
            )
        next_token_ids = out_tokens.clamp_min(0).flatten()
        if self.vocab is not None:
            self.vocab.observe(out_tokens)  # -1 pads the rejected positions: not counted
        if want_logprob:
            forwards.spec_logprobs(batch, logits_output, next_token_ids, width)
        accept_lens = (accept_len + 1).to(torch.int32)
        # one host copy per iteration feeds metrics, policy and per-request tags (one sync on GPU)
        accepted_host = accept_len.to("cpu", torch.int64)
        phases = {"verify": (t_verify, 1)}
        if run_drafter:
            phases["draft_step"] = (t_draft, gamma)
        self.metrics.record(gamma, accepted_host, bs, phases, sources=plan.source if plan else None)
        if plan is not None:
            self.history.observe(plan, accepted_host.tolist())
        if self.controller:
            timed = {"draft": t_draft, "verify": t_verify} if run_drafter else {"verify": t_verify}
            self.controller.observe(
                gamma, timed, accepted_host, rows=plan.w4_rows if plan else None, draft_split=draft_split
            )
        self._log_iteration(
            batch,
            logits_output,
            gamma,
            (accepted_host + 1).tolist(),
            draft_s=t_draft if run_drafter else None,
            verify_s=t_verify,
            accepted=int(accepted_host.sum()),
            history_rows=len(plan.history_rows) if plan else 0,
            sources=plan.source if plan else None,
        )
        return forwards.generation_result(
            logits_output=logits_output,
            next_token_ids=next_token_ids,
            can_run_cuda_graph=False,
            accept_lens=accept_lens,
            new_seq_lens=(seq_lens + accept_lens).to(seq_dtype),
            next_draft_input=None,
            speculative_num_draft_tokens=width,
        )

    def _inject_fault(self, plan, draft_tokens, target_logits, params, accept_len, out_tokens):
        """Test-only, NOT lossless: accept every draft (``accept_all``) or every history draft
        (``accept_all_history``), so the distribution tests can prove they detect a wrong rule."""
        gamma = draft_tokens.shape[1]
        rows = torch.ones_like(accept_len, dtype=torch.bool)
        if self.config.inject_fault == "accept_all_history":
            rows = (
                torch.tensor([s in HISTORY_SOURCES for s in plan.source], device=self.device)
                if plan is not None
                else torch.zeros_like(rows)
            )
        p = sampler.target_probs(target_logits, params)
        forced = torch.cat([draft_tokens, sampler.sample(p[:, gamma])[:, None]], 1)
        return (
            torch.where(rows, torch.full_like(accept_len, gamma), accept_len),
            torch.where(rows[:, None], forced, out_tokens),
        )

    def _log_iteration(self, batch, logits_output, gamma: int, new_tokens: list[int], **times) -> None:
        bs = len(batch.reqs)
        if self.controller is not None and self.iteration % 64 == 0:
            state = self.controller.state()
            self.metrics.record_policy(state)
            logger.info(
                "EFFROLLOUT auto: %s speculating so far, α %s, phase error %s",
                f"{self.metrics.iterations_spec / max(1, self.iteration):.0%}",
                [round(a, 2) for a in state["alphas"]],
                {
                    p: round(e["mean_rel_err_corrected"], 2)
                    for p, e in state["model_error"].items()
                    if e["window"] and e["mean_rel_err_corrected"] is not None
                },
            )
        spec_meta.tag(batch.reqs, self.iteration, gamma, new_tokens, times.get("sources"))
        decision = self.controller.last_decision if self.controller is not None else None
        self._last_record = self.timeline.append(
            iteration=self.iteration,
            gamma=gamma,
            batch_size=bs,
            seq_lens=self._seq_list,
            plain_s=times.get("plain_s"),
            draft_s=times.get("draft_s"),
            verify_s=times.get("verify_s"),
            accepted=times.get("accepted"),
            history_rows=times.get("history_rows", 0),
            predicted_speedup=None if decision is None else _finite(decision.speedup),
            best_spec_speedup=None if decision is None else _finite(decision.best_spec_speedup),
        )


def _finite(x: float):
    return x if x == x and x not in (float("inf"), float("-inf")) else None


class _Clock:
    """Phase timer; synchronises an accelerator so a lap measures the work, not its launch."""

    def __init__(self, device: torch.device):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._sync()
        self._t = time.perf_counter()

    def lap(self) -> float:
        self._sync()
        t = time.perf_counter()
        dt, self._t = t - self._t, t
        return dt
