"""EFFROLLOUT speculative worker: draft γ tokens with the W4 self-drafter, verify losslessly.

One decode iteration, for a batch whose committed prefix (tokens with KV) has length
``seq_lens`` [B] and whose last sampled token x0 [B] has no KV yet:

1. draft: ask the proposers once for a :class:`~sglang_er.draft.proposal.Proposal` (tokens
   [B, γ], q): the W4 drafter runs γ steps at positions seq_lens .. seq_lens+γ-1, each sampled
   with the request's own sampling parameters, reading the committed KV and keeping its own
   tokens' K/V in per-iteration buffers; history drafts (off by default) take the rows where
   their measured acceptance beats it;
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
from dataclasses import dataclass

import torch
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

from sglang_er import sampler
from sglang_er.config import EffRolloutConfig
from sglang_er.draft.drafter import Drafter
from sglang_er.draft.proposal import Proposal
from sglang_er.draft.vocab import DraftVocab
from sglang_er.engine import batch as batch_view
from sglang_er.engine import forwards, model, server_info
from sglang_er.engine.draft_input import ChainDraftInput
from sglang_er.engine.grammar import GrammarChain
from sglang_er.engine.recorder import IterationRecorder
from sglang_er.engine.tp_sync import RankSync
from sglang_er.gamma.controller import Controller
from sglang_er.history.proposer import HistoryProposer
from sglang_er.metrics import SpecMetrics, Timeline
from sglang_er.quant.awq import AWQQuantizer
from sglang_er.quant.live_stats import LiveStats
from sglang_er.quant.w4linear import SLOW_KERNELS

logger = logging.getLogger(__name__)


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
        self._kv = None
        self.ranks = RankSync(self.device, getattr(server_args, "random_seed", None))
        self._generator = None  # this iteration's random stream (None: torch's global one)
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
        self._recent = None  # the last step's committed tokens, for history lookups (see _remember)
        if self.config.history != "off":
            self.history = HistoryProposer(
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
                tp_size=self.ranks.size,
            )
        self.recorder = IterationRecorder(self.metrics, self.timeline, self.controller, self.device)
        self.w4_kernels = kernels = self.drafter.kernels()  # fixed once built: re-quantization keeps them
        logger.info(
            "EFFROLLOUT drafter ready: %d layers, W4 weights %.1f MB on %s, γ max %d, schedule %s",
            len(self.drafter.layers),
            self.drafter.weight_bytes() / 2**20,
            ", ".join(kernels),
            self.speculative_num_steps,
            self.config.gamma_schedule or "fixed",
        )
        for kernel in kernels.keys() & SLOW_KERNELS.keys():
            logger.warning("EFFROLLOUT W4 kernel %s (%s): %s", kernel, kernels[kernel], SLOW_KERNELS[kernel])

    @property
    def draft_worker(self):
        return None  # the drafter is not an SGLang model runner and owns no KV

    def weight_update_runners(self):
        return []

    def on_weights_updated(self) -> None:
        """Called by :mod:`sglang_er.engine.weight_sync` after each completed weight update."""
        self._kv = None  # a memory resume may have re-created the KV pool's buffers
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
            "w4_kernels": self.w4_kernels,
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
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None):
        """One scheduler step. ``on_publish(new_seq_lens)`` (overlap scheduler only) hands the
        committed lengths to SGLang's FutureMap; ``grammar_barrier`` is never passed (EFFROLLOUT
        leaves grammar batches on SGLang's synchronous path)."""
        want_logprob = batch.return_logprob  # the verify forward clears it; the scheduler's copy reads it
        try:
            result = self._step(batch)
        finally:
            batch.return_logprob = want_logprob
        if on_publish is not None:
            on_publish(result.new_seq_lens)
        return result

    def _step(self, batch):
        entered = time.perf_counter()
        if not batch.forward_mode.is_decode():
            self.recorder.prefill()
            return self._prefill(batch)
        self.recorder.enter(entered)
        if self._maybe_activate_awq() | self._maybe_refresh_vocab():
            self.recorder.restart()
        # committed lengths before the forwards rebind batch.seq_lens (host copy: no device sync)
        self._seq_list = batch_view.seq_lens_host(batch)
        logits_only = batch_view.logits_only_features(batch)
        gamma, self._generator = self.ranks.iteration(self._choose_gamma(batch, logits_only))
        # history proposals are not checked against grammars: constrained batches take W4 drafts
        plan = self._history_proposal(batch, gamma, logits_only or batch_view.has_grammar(batch))
        self.recorder.iteration += 1
        if plan is not None:
            return self._speculate(batch, plan.gamma, plan)
        return self._plain_decode(batch) if gamma == 0 else self._speculate(batch, gamma)

    def _choose_gamma(self, batch, logits_only: bool) -> int:
        if logits_only:
            return 0
        if self.controller is not None:
            return self.controller.choose(self._seq_list, batch_view.rids(batch), lambda: batch_view.prompt_keys(batch))
        return self.config.gamma_for_iteration(self.recorder.iteration)

    def _history_proposal(self, batch, gamma: int, logits_only: bool):
        """The history proposer's drafts for this iteration (:meth:`HistoryProposer.propose`), or None."""
        if self.history is None:
            return None
        ctl = self.controller
        return self.history.propose(
            batch.reqs,
            gamma,
            ctl.w4_expected_tokens() if ctl else None,
            ctl.verify_only_gain if ctl else None,
            speculate=not logits_only and (ctl is not None or gamma > 0),
            outputs=batch_view.committed_outputs(self._seq_list, self._recent),
        )

    def _remember(self, batch, tokens: torch.Tensor, lens: torch.Tensor) -> None:
        """Keep a step's committed tokens (tokens [B, w], the first lens [B] of each row) for the
        next step's history lookups: under the overlap scheduler ``output_ids`` lack them then."""
        if self.history is not None:
            self._recent = (batch_view.rids(batch), tokens, lens)

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
        return self._one_token_result(batch, res, new_seq_lens=batch.seq_lens)

    def _observed(self):
        """A target forward whose linear inputs may feed the AWQ statistics."""
        return self.live_stats.window() if self.live_stats is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ γ = 0
    def _plain_decode(self, batch):
        """One plain SGLang decode step (its sampler, its logprobs): the γ = 0 iteration."""
        seq_lens = batch.seq_lens  # [B]
        clock = self.recorder.clock()
        x0 = batch_view.last_tokens(batch, self.device)  # [B]
        slot = batch_view.slots(self.req_to_token_pool.req_to_token, batch, 1)[:, 0]  # [B]
        res = forwards.decode_forward(self._target_worker, batch, x0, slot, seq_lens)  # logprobs: the sampler's
        if self.vocab is not None:
            self.vocab.observe(res.next_token_ids)
        clock.mark("plain")
        self.recorder.plain(batch.reqs, self._seq_list, clock)
        return self._one_token_result(batch, res, new_seq_lens=seq_lens + 1)

    def _one_token_result(self, batch, res, new_seq_lens):
        """The result of a forward that committed one token per request (a prefill, a plain step)."""
        ones = torch.ones(len(batch.reqs), dtype=torch.int32, device=self.device)  # [B]
        self._remember(batch, res.next_token_ids[:, None], ones)
        return forwards.generation_result(
            logits_output=res.logits_output,
            next_token_ids=res.next_token_ids,
            can_run_cuda_graph=res.can_run_cuda_graph,
            accept_lens=ones,
            new_seq_lens=new_seq_lens,
            next_draft_input=ChainDraftInput(bonus_tokens=res.next_token_ids),
            speculative_num_draft_tokens=1,
        )

    # ------------------------------------------------------------------ γ ≥ 1
    def _speculate(self, batch, gamma: int, plan=None):
        """One draft-verify iteration: propose γ tokens per request, verify them in one target
        forward, commit the accepted run plus one token. ``plan``: history drafts for some rows."""
        if self._kv is None:
            self._kv = model.kv_view(self.model_runner)
        it = _Iteration.read(self, batch, gamma)
        clock = self.recorder.clock()
        drafts = self._draft(it, plan, clock)
        verdict = self._verify(batch, it, drafts, clock)
        return self._commit(batch, it, drafts, verdict, plan, clock)

    def _draft(self, it: _Iteration, plan, clock) -> Proposal:
        """Ask the proposers: the W4 drafter (unless the history plan covers every row; under
        the grammar's masks for constrained rows), then the history plan's rows over the drafter's."""
        w4 = None
        if plan is None or plan.run_drafter:
            req_to_token = self.req_to_token_pool.req_to_token
            kv_index = batch_view.committed_slots(req_to_token, it.batch, max(self._seq_list))
            attn = self.drafter.attention(self._kv, kv_index, it.seq_lens, it.gamma)
            # the first step also gathers the committed KV (κ in the cost model)
            first = (lambda: clock.mark("draft_first")) if it.gamma > 1 else None
            params = None if it.greedy else it.params
            try:
                w4 = self.drafter.propose(it.x0, it.seq_lens, attn, params, first, it.grammar, self._generator)
            finally:
                if it.grammar is not None:
                    it.grammar.rollback()  # the scheduler advances the matchers over what is committed
        drafts = w4 if plan is None else plan.merge(it.x0, w4, self.drafter.view.vocab_size, it.greedy)
        self.ranks.rank0(drafts.tokens)  # the verify's inputs must agree on every rank
        clock.mark("draft" if drafts.ran_drafter else "propose")
        return drafts

    def _verify(self, batch, it: _Iteration, drafts: Proposal, clock) -> _Verdict:
        """One target forward over [x0, d1..dγ] into the KV slots the scheduler allocated, then the
        exact acceptance test (:func:`sglang_er.sampler.verify`)."""
        width = it.gamma + 1
        ids = torch.cat([it.x0[:, None], drafts.tokens], 1)  # [B, γ+1]
        slots = batch_view.slots(self.req_to_token_pool.req_to_token, batch, width)  # [B, γ+1]
        with self._observed():
            out = forwards.verify_forward(
                self._target_worker, batch, ids.flatten(), slots.flatten(), it.seq_lens, width
            )
        logits = out.next_token_logits.view(it.bs, width, -1)  # [B, γ+1, V]
        if it.grammar is not None:
            it.grammar.mask_verify(logits)  # as plain SGLang's sampler masks a constrained request
        p = None
        if it.greedy:
            accept_len, tokens = sampler.verify_greedy(drafts.tokens, logits)
        else:
            p = sampler.target_probs(logits, it.params)  # [B, γ+1, V]
            accept_len, tokens = sampler.verify(drafts.tokens, drafts.q, p, self._generator)
        # the acceptance test belongs to the verify phase, as sampling belongs to the plain step
        clock.mark("verify")
        return _Verdict(out, logits, p, accept_len, tokens)

    def _commit(self, batch, it: _Iteration, drafts: Proposal, v: _Verdict, plan, clock):
        """Hand SGLang the accepted run plus one token per request; record the iteration."""
        width = it.gamma + 1
        if self.ranks.size > 1:  # every rank commits rank 0's verdict
            verdict = self.ranks.rank0(torch.cat([v.accept_len[:, None], v.tokens], 1).contiguous())  # [B, 1 + γ+1]
            v.accept_len, v.tokens = verdict[:, 0], verdict[:, 1:]
        next_token_ids = v.tokens.clamp_min(0).flatten()  # [B * (γ+1)]; -1 pads after the run
        if self.vocab is not None:
            self.vocab.observe(v.tokens)  # the -1 pads weigh nothing
        if it.want_logprob:
            forwards.spec_logprobs(batch, v.logits_output, next_token_ids, width)
        accept_lens = (v.accept_len + 1).to(torch.int32)  # [B]
        # the iteration's one host copy (one sync on a GPU): metrics, γ choice, tags and the phase times
        accepted = v.accept_len.to("cpu", torch.int64)
        if self.history is not None:  # verified proposals, and unused ones measured for free
            self.history.observe(plan, drafts.tokens, accepted.tolist(), v.probs, v.logits)
        times = clock.seconds()
        if "draft_first" in times:
            times["draft"] += times["draft_first"]
        self.recorder.speculative(batch.reqs, self._seq_list, it.gamma, accepted, times, plan)
        self._remember(batch, v.tokens, accept_lens)
        return forwards.generation_result(
            logits_output=v.logits_output,
            next_token_ids=next_token_ids,
            can_run_cuda_graph=False,
            accept_lens=accept_lens,
            new_seq_lens=(it.seq_lens + accept_lens).to(it.seq_dtype),
            # the last token committed: x0 of the next iteration
            next_draft_input=ChainDraftInput(bonus_tokens=v.tokens.gather(1, v.accept_len[:, None].long())[:, 0]),
            speculative_num_draft_tokens=width,
        )


@dataclass
class _Iteration:
    """What one speculative iteration reads of its batch before the forwards rebind it."""

    batch: object
    gamma: int
    bs: int
    x0: torch.Tensor  # [B] the last sampled token, no KV yet
    seq_lens: torch.Tensor  # [B] int64, committed tokens with KV
    seq_dtype: torch.dtype
    params: sampler.SamplingParamsTensor
    greedy: bool
    want_logprob: bool  # verify_forward clears it on the batch
    grammar: GrammarChain | None  # the masks of constrained rows (None: no grammar in the batch)

    @classmethod
    def read(cls, worker: EffRolloutWorker, batch, gamma: int) -> _Iteration:
        params = sampler.SamplingParamsTensor.from_sampling_info(batch.sampling_info)
        return cls(
            batch=batch,
            gamma=gamma,
            bs=len(batch.reqs),
            x0=batch_view.last_tokens(batch, worker.device),
            seq_lens=batch.seq_lens.to(torch.int64),
            seq_dtype=batch.seq_lens.dtype,
            params=params,
            greedy=params.is_all_greedy,
            want_logprob=batch.return_logprob,
            grammar=GrammarChain.of(batch.reqs, gamma, worker.drafter.view.vocab_size, worker.device),
        )


@dataclass
class _Verdict:
    logits_output: object  # SGLang's LogitsProcessorOutput of the verify
    logits: torch.Tensor  # [B, γ+1, V]
    probs: torch.Tensor | None  # [B, γ+1, V] the target's distributions (None: greedy)
    accept_len: torch.Tensor  # [B] drafts accepted
    tokens: torch.Tensor  # [B, γ+1] the accepted drafts and one more token, then -1
