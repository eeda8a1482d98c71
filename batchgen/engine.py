"""Engine (add_request / step, streaming finished outputs) and the LLM facade (generate, chat).

The engine owns the model, the KV pool, the scheduler and the runner. It knows nothing of files:
the job layer feeds it through `add_request` and drains `step()`.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass, field

import torch

from batchgen.cache.kv_manager import KVCacheManager, cdiv
from batchgen.config import EngineConfig
from batchgen.detokenizer import IncrementalDetokenizer
from batchgen.exec.model_runner import CASCADE_MIN_BLOCKS, ModelRunner
from batchgen.kernels import huge_pages
from batchgen.models.loader import iter_safetensors, pick_dtype, read_eos_token_ids, resolve_model
from batchgen.models.packed_linear import can_pack
from batchgen.models.registry import language_model_config, model_class
from batchgen.reasoning import BudgetTracker, Markers, parse_reasoning, split_ids
from batchgen.request import Request
from batchgen.sampling import CompletionOutput, RequestOutput, SamplingParams
from batchgen.sched.output import SchedulerOutput
from batchgen.sched.scheduler import Scheduler, SchedulerConfig
from batchgen.speculative.draft import DraftProposer
from batchgen.speculative.ngram import NgramProposer

logger = logging.getLogger("batchgen")

GiB = 1 << 30


@dataclass
class _Group:
    """The n child requests of one user request, reported together once all have finished."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    lora: str | None
    children: list[Request]
    detokenizers: dict[str, IncrementalDetokenizer] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    num_finished: int = 0

    def child(self, request_id: str) -> Request:
        return next(c for c in self.children if c.request_id == request_id)


class Engine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        self.config = config = config or EngineConfig.from_kwargs(**kwargs)
        self.device = _pick_device(config.device)
        self.tp = None  # batchgen.distributed.group.TPGroup when tensor_parallel_size > 1
        if config.tensor_parallel_size > 1:
            from batchgen.distributed.group import join_or_start

            self.tp = join_or_start(config.tensor_parallel_size, config, self.device)
            self.device = self.tp.device  # this rank's GPU (cuda:local_rank), or the CPU
        self.attention_backend = _pick_attention_backend(config.attention_backend, self.device)
        from transformers import AutoConfig, AutoTokenizer

        self.model_dir = resolve_model(config.model)
        self.hf_config = language_model_config(AutoConfig.from_pretrained(self.model_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or self.model_dir)
        self.eos_token_ids = read_eos_token_ids(self.model_dir, self.hf_config)
        markers = parse_reasoning(config.reasoning_parser)
        self.reasoning = Markers.of(self.tokenizer, *markers) if markers else None  # token ids of the markers
        self.vocab_size = self.hf_config.vocab_size
        self.dtype = pick_dtype(config.dtype, self.device)
        self.model = self._load_model(self.model_dir, self.hf_config)
        self.speculative = config.speculative
        # Tensor parallel: the draft runs whole on rank 0 alone; its proposals reach the other ranks in each
        # step's rows (worker.StepSender), so the draft's forwards need no collectives.
        self.draft_model = (self._load_draft() if self.speculative and self.speculative.method == "draft"
                            and self._is_rank0() else None)
        self.lora, lora_slots = self._load_loras()  # before sizing the KV pool: slots take device memory

        self.block_size = config.block_size
        budget = config.max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)
        num_blocks = self._num_kv_blocks(budget)
        if self.tp is not None:  # every rank holds the same block ids: the rank with least memory decides
            num_blocks = self.tp.min_int(num_blocks)
        self.max_model_len = self._max_model_len(num_blocks)
        # One block more than the pool manages: the null block, where CUDA-graph padding rows write.
        self.kv_caches = self._allocate_kv(num_blocks + 1)
        self.kv = KVCacheManager(num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            config.max_num_seqs, budget, self.max_model_len,
            num_speculative_tokens=self.speculative.num_speculative_tokens if self.speculative else 0,
            spec_max_batch_size=self.speculative.max_batch_size if self.speculative else 0), self.kv, lora_slots)
        self.runner = ModelRunner(self.model, self.kv_caches, self.block_size, self.device, config.seed)
        self.runner.cascade_min_blocks = CASCADE_MIN_BLOCKS if config.cascade_attention else 0
        self.runner.lora = self.lora
        self.runner.attention_backend = self.attention_backend
        if self.speculative and self._is_rank0():  # a rank > 0 replays rank 0's rows, proposals included
            self.runner.proposer = self._make_proposer(num_blocks)
        if self.tp is not None and self.tp.rank == 0:
            from batchgen.distributed.worker import StepSender

            self.runner.tp = StepSender(self.tp)  # the other ranks run each forward rank 0 runs
        if self.device.type == "cuda" and self.attention_backend == "triton" and not config.enforce_eager \
                and self.tp is None:  # no graphs around collectives
            from batchgen.exec.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(self.model, self.kv_caches, min(config.max_num_seqs, 256), self.max_model_len,
                                  self.block_size, num_blocks, self.device)
            try:
                graphs.capture()
                self.runner.graphs = graphs
            except Exception as e:  # noqa: BLE001 - a forward that cannot be captured still runs eagerly
                logger.warning("CUDA graph capture failed (%s); decoding eagerly (as with enforce_eager=True)",
                               str(e).splitlines()[0] if str(e) else type(e).__name__)

        self.structured = None  # batchgen.structured.StructuredState, made at the first constrained request
        self._groups: dict[str, _Group] = {}  # by child request id
        self._ready: list[RequestOutput] = []  # finished outside a step (bad input)
        self._counters = dict(steps=0, generated_tokens=0, requests_finished=0, request_errors=0,
                              runner_seconds=0.0, step_seconds=0.0)
        if self.reasoning is not None:  # generated tokens inside reasoning blocks, and the rest
            self._counters.update(reasoning_tokens=0, answer_tokens=0)
        logger.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
                    config.model, self.device, self.dtype, num_blocks, self.block_size, self.max_model_len)
        if self.tp is not None:
            self._start_tensor_parallel()

    def _start_tensor_parallel(self) -> None:
        """Rank 0 returns to its caller; a rank > 0 serves rank 0's steps until told to stop."""
        if self.tp.rank == 0:
            self.tp.start_heartbeat()
            weakref.finalize(self, self.tp.shutdown)  # an engine dropped without shutdown() stops its ranks
            return
        from batchgen.distributed.worker import serve

        serve(self)
        if self.tp.external:  # torchrun / srun: this process existed only to be a rank
            self.tp.shutdown()
            raise SystemExit(0)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (also done at exit); without TP there is nothing to do."""
        if self.tp is not None:
            self.tp.shutdown()

    # ---- set-up -------------------------------------------------------------------------------

    def _is_rank0(self) -> bool:
        return self.tp is None or self.tp.rank == 0

    def _load_model(self, model_dir: str, hf_config, shard: bool = True) -> torch.nn.Module:
        """The model on this engine's device; under tensor parallelism this rank's shards of it, unless
        shard=False (the draft model, whole on rank 0)."""
        cls = model_class(hf_config)
        shard = shard and self.tp is not None
        with torch.device("meta"):
            model = cls(hf_config)  # no random init: every weight comes from the checkpoint
            if shard:  # this rank's shards only, read shard by shard
                from batchgen.distributed.layers import shard_model
                from batchgen.distributed.loading import iter_shards

                weights = iter_shards(model_dir, shard_model(model, self.tp))
        model = model.to(dtype=self.dtype).to_empty(device=self.device)
        model.load_weights(weights if shard else iter_safetensors(model_dir))
        if can_pack(self.device, self.dtype):
            model.pack_for_cpu()
        if self.attention_backend == "triton":  # before anything runs it (the memory-profiling forward)
            from batchgen.exec.attention_triton import use_triton_attention

            use_triton_attention(model)
        return model.eval()

    def _load_loras(self):
        """PEFT adapters (all read and checked now, kept in CPU memory) and the device slots they
        take turns in: (LoRAWeights, LoRASlots), or (None, None) without adapters."""
        if not self.config.lora_adapters:
            return None, None
        from batchgen.lora.adapters import ProjectionDims, load_adapters
        from batchgen.lora.layers import LoRAWeights
        from batchgen.lora.slots import LoRASlots

        adapters = load_adapters(self.config.lora_adapters,
                                 getattr(self.model, "tp_full_dims", None) or ProjectionDims.of_model(self.model),
                                 self.config.max_lora_rank)
        if self.tp is not None:  # cut to this rank's projection shards
            from batchgen.distributed.lora import shard_adapter

            adapters = {name: shard_adapter(a, self.model.tp_plan) for name, a in adapters.items()}
        num_slots = min(self.config.max_loras, len(adapters))
        weights = LoRAWeights(self.model, adapters, num_slots, self.dtype, self.device)  # keeps them packed
        if self.tp is not None:  # row-parallel deltas are partial sums, like the base output
            weights.reduce = self.tp.all_reduce
        logger.info("LoRA: %d adapter(s) (%s), %d device slot(s), max rank %d", len(adapters),
                    ", ".join(adapters), num_slots, weights.max_rank)
        return weights, LoRASlots(num_slots)

    def _load_draft(self) -> torch.nn.Module:
        from transformers import AutoConfig

        draft_dir = resolve_model(self.speculative.draft_model)
        draft_config = language_model_config(AutoConfig.from_pretrained(draft_dir))
        if draft_config.vocab_size != self.vocab_size:
            raise ValueError(f"draft model {self.speculative.draft_model!r} has vocab_size {draft_config.vocab_size}, "
                             f"the target {self.vocab_size}: a draft must share the target's tokenizer")
        return self._load_model(draft_dir, draft_config, shard=False)

    def _make_proposer(self, num_blocks: int):
        if self.speculative.method == "ngram":
            return NgramProposer(self.speculative.prompt_lookup_min, self.speculative.prompt_lookup_max)
        draft_kv = self._allocate_kv(num_blocks + 1, self.draft_model)
        return DraftProposer(self.draft_model, draft_kv, self.runner.prepare, self.device, self.config.seed)

    def _kv_bytes_per_block(self) -> int:
        """Target and draft KV for one block: the draft shares the target's block ids."""
        return sum(2 * len(m.layers) * self.block_size * m.num_kv_heads * m.head_dim * self.dtype.itemsize
                   for m in (self.model, self.draft_model) if m is not None)

    def _num_kv_blocks(self, token_budget: int) -> int:
        c = self.config
        if c.num_kv_blocks:
            return c.num_kv_blocks
        if c.kv_cache_memory:
            budget = c.kv_cache_memory * GiB
        elif self.device.type == "cuda":
            activations = self._profile_forward(token_budget)
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * c.gpu_memory_utilization - (total - free) - activations
            logger.info("GPU memory: %.2f GiB in use (weights, adapters), %.2f GiB peak for a forward at %d "
                        "tokens; %.2f GiB for the KV pool", (total - free) / GiB, activations / GiB,
                        token_budget, budget / GiB)
        else:
            budget = min(2 * GiB, 0.2 * _available_memory())
        blocks = int(budget // self._kv_bytes_per_block())
        if blocks < 2:
            raise ValueError(f"no memory left for the KV cache (budget {budget / GiB:.2f} GiB); "
                             "lower max_num_batched_tokens or set kv_cache_memory / num_kv_blocks")
        return blocks

    @torch.inference_mode()
    def _profile_forward(self, token_budget: int) -> int:
        """Peak bytes of one forward at the full token budget (one row of that many tokens, in a
        throwaway KV pool just big enough), plus the fp32 logits and probabilities of a full decode
        batch. Measured on CUDA; elsewhere the forward still runs (it checks the path) and 0 is returned."""
        from batchgen.sched.output import ScheduledRequest

        blocks = cdiv(token_budget, self.block_size)
        kv = self._allocate_kv(blocks + 1)
        runner = ModelRunner(self.model, kv, self.block_size, self.device, self.config.seed)
        runner.attention_backend = self.attention_backend
        row = ScheduledRequest("profile", [0] * token_budget, 0, list(range(blocks)), True, SamplingParams(temperature=0),
                               None, 0)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        runner.execute(SchedulerOutput([row]))
        peak = torch.cuda.max_memory_allocated(self.device) - before if cuda else 0
        del kv, runner
        if cuda:
            torch.cuda.empty_cache()
        logits = 2 * min(self.config.max_num_seqs, token_budget) * self.vocab_size * 4
        return (peak + logits) if cuda else 0

    def _max_model_len(self, num_blocks: int) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None) or 4096
        length = self.config.max_model_len or limit
        capacity = num_blocks * self.block_size
        if length > capacity:
            logger.warning("max_model_len %d capped to the KV pool's %d tokens", length, capacity)
            length = capacity
        return length

    def _allocate_kv(self, num_blocks: int, model: torch.nn.Module | None = None) -> list[torch.Tensor]:
        m = model or self.model
        shape = (2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        if self.device.type == "cpu":  # decode reads rows' blocks scattered over the pool: fewer TLB misses
            return [huge_pages.zeros(shape, self.dtype) for _ in m.layers]
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in m.layers]

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora: str | None = None) -> None:
        """Queue a request. Bad input never raises: it comes back from the next step() with `error` set."""
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        try:
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        except Exception as e:  # a tokenizer failure is this row's problem, not the batch's
            self._counters["request_errors"] += 1
            self._ready.append(_error_output(request_id, text, [], f"tokenization failed: {e}"))
            return
        if params.truncate_prompt_tokens is not None:  # vLLM: keep the last N tokens
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        error = self._check_request(token_ids, params, lora)
        if error:
            self._counters["request_errors"] += 1
            self._ready.append(_error_output(request_id, text, token_ids, error))
            return
        children = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seed = None if params.seed is None else params.seed + i
            children.append(Request(child_id, token_ids, params, self.eos_token_ids, lora, seed))
            if params.thinking_token_budget is not None:
                children[-1].budget = BudgetTracker(token_ids, self.reasoning, params.thinking_token_budget)
        group = _Group(request_id, text, token_ids, lora, children)
        if params.bad_words and getattr(params, "bad_words_token_ids", None) is None:
            from batchgen.exec.penalties import bad_words_token_ids

            # Set on the params as vLLM does (not a field: the same words give the same ids)
            params.bad_words_token_ids = bad_words_token_ids(params, self.tokenizer)
        if params.structured_outputs is not None:
            structured = self._structured_state()
            for child in children:  # each sample its own matcher; the compile is shared (cached)
                structured.add(child)
        for child in children:
            if params.stop:
                group.detokenizers[child.request_id] = IncrementalDetokenizer(
                    self.tokenizer, token_ids, params.stop, params.skip_special_tokens)
            self._groups[child.request_id] = group
            self.scheduler.add(child)

    def _check_request(self, token_ids: list[int], params: SamplingParams, lora: str | None) -> str | None:
        if not token_ids:
            return "empty prompt"
        if len(token_ids) > self.max_model_len:
            return f"prompt has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}"
        bad = next((t for t in token_ids if not isinstance(t, int) or t < 0 or t >= self.vocab_size), None)
        if bad is not None:
            return f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})"
        bad_stops = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stops:
            return f"stop_token_ids {bad_stops} are outside the vocabulary [0, {self.vocab_size})"
        for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ())):
            outside = [t for t in ids if t >= self.vocab_size]
            if outside:
                return f"{name} token ids {outside} are outside the vocabulary [0, {self.vocab_size})"
        if params.thinking_token_budget is not None and self.reasoning is None:
            return ("thinking_token_budget needs reasoning markers: set the engine's reasoning_parser "
                    "(a job's output.reasoning)")
        if lora is not None and (self.lora is None or lora not in self.lora.adapters):
            loaded = ", ".join(map(repr, self.lora.adapters)) if self.lora is not None else "none"
            return f"unknown LoRA adapter {lora!r}; loaded: {loaded}"
        return None

    def _structured_state(self):
        if self.structured is None:
            from batchgen.structured import StructuredState

            # The bitmask is as wide as the logits: the LM head's rows (vocab_size may exceed the tokenizer's).
            self.structured = StructuredState(
                self.tokenizer, self.vocab_size, self.eos_token_ids, self.device,
                max_rows=self.config.max_num_seqs, compile_timeout=self.config.structured_outputs_compile_timeout)
            self.runner.sampler.structured = self.structured
        return self.structured

    def _poll_grammars(self) -> list[RequestOutput]:
        """Requests whose grammar finished compiling become schedulable; a failed or timed-out compile
        errors its request (all n samples) and only it."""
        outputs = []
        for req, error in self.structured.poll():
            group = self._groups.get(req.request_id)
            if group is None:
                continue  # a sibling sample already failed the group
            for child in group.children:
                self.scheduler.finish(child, "error")
                self._groups.pop(child.request_id, None)
                self.structured.forget(child.request_id)
            self._counters["request_errors"] += 1
            outputs.append(_error_output(group.request_id, group.prompt, group.prompt_token_ids, error))
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._ready) or self.scheduler.has_unfinished()

    def num_unfinished(self) -> int:
        return len(self._ready) + len({id(g) for g in self._groups.values()})

    def abort_all(self) -> None:
        """Drop every request in flight; none of them is reported."""
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(req, "abort")
            if self.structured is not None:
                self.structured.forget(req.request_id)
        self._groups.clear()
        self._ready.clear()

    # ---- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and return the requests that finished in it."""
        outputs, self._ready = self._ready, []
        if self.structured is not None and self.structured.waiting:
            outputs += self._poll_grammars()
            if self.scheduler.has_unfinished() and not self.scheduler.running \
                    and not any(r.grammar_ready for r in self.scheduler.waiting):
                self.structured.wait(timeout=0.05)  # every request waits for a grammar: nothing to step
                return outputs + self._poll_grammars()
        if not self.scheduler.has_unfinished():
            return outputs
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            raise RuntimeError("scheduler made no progress: the KV pool cannot hold even one request")
        t1 = time.perf_counter()
        model_out = self.runner.execute(sched)
        t2 = time.perf_counter()
        # What each sampled row gains this step is read off the request: one token, or with
        # speculation the accepted proposals too (cut at a stop token).
        sampled = [self._groups[r.request_id].child(r.request_id) for r in sched.scheduled if r.sample]
        before = [req.num_output_tokens for req in sampled]
        finished = self.scheduler.update(sched, model_out)
        new_tokens = [req.output_token_ids[n:] for req, n in zip(sampled, before)]
        self._counters["generated_tokens"] += sum(map(len, new_tokens))
        if self.structured is not None:  # advance each matcher; a grammar that terminated ends its row: "stop"
            for req, tokens in zip(sampled, new_tokens):
                if self.structured.advance(req, tokens) and not req.finished:
                    self.scheduler.finish(req, "stop")
                    finished.append(req)

        # Stop strings: detokenize incrementally only the requests that have them.
        for req, n, tokens in zip(sampled, before, new_tokens):
            detokenizer = self._groups[req.request_id].detokenizers.get(req.request_id)
            if detokenizer is None:
                continue
            for k, token in enumerate(tokens):
                hit = detokenizer.append(token)
                if hit is not None and n + k + 1 >= req.params.min_tokens:
                    break
            else:
                continue
            if k + 1 < len(tokens):  # accepted proposals past the one completing the stop string
                del req.token_ids[k + 1 - len(tokens):]
                if req.logprobs is not None:
                    del req.logprobs[k + 1 - len(tokens):]
            at, req.stop_reason = hit
            if req.params.include_stop_str_in_output:
                at += len(hit[1])
            self._groups[req.request_id].texts[req.request_id] = detokenizer.text[:at]
            if req.finished:
                req.finish_reason = "stop"  # its last token both ended it and completed a stop string
            else:
                self.scheduler.finish(req, "stop")
                finished.append(req)
        for req in finished:
            out = self._on_finished(req)
            if out is not None:
                outputs.append(out)
        self._counters["steps"] += 1
        self._counters["runner_seconds"] += t2 - t1
        self._counters["step_seconds"] += time.perf_counter() - t0
        return outputs

    def _on_finished(self, req: Request) -> RequestOutput | None:
        group = self._groups.pop(req.request_id)
        group.num_finished += 1
        if group.num_finished < len(group.children):
            return None
        completions = []
        for i, child in enumerate(group.children):
            if self.structured is not None:
                self.structured.forget(child.request_id)
            text = group.texts.get(child.request_id)
            if text is None:
                text = self.tokenizer.decode(child.output_token_ids,
                                             skip_special_tokens=child.params.skip_special_tokens)
            completion = CompletionOutput(i, text, child.output_token_ids, child.finish_reason,
                                          child.logprobs, child.stop_reason)
            if self.reasoning is not None:
                self._split_reasoning(completion, group.prompt_token_ids, child.params, text is not None
                                      and child.request_id in group.texts)
            completions.append(completion)
        self._counters["requests_finished"] += 1
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions,
                             num_cached_tokens=group.children[0].num_cached_tokens, lora=group.lora,
                             prompt_logprobs=group.children[0].prompt_logprobs)

    def _split_reasoning(self, c: CompletionOutput, prompt_ids: list[int], params: SamplingParams,
                         stopped_by_string: bool) -> None:
        """reasoning_text apart from the answer (batchgen/reasoning.py says how)."""
        split = split_ids(prompt_ids, c.token_ids, self.reasoning)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)  # noqa: E731
        answer = decode(split.answer_ids)
        if stopped_by_string and isinstance(c.stop_reason, str) and c.stop_reason in answer:
            cut = answer.index(c.stop_reason) + (len(c.stop_reason) if params.include_stop_str_in_output else 0)
            answer = answer[:cut]
        c.reasoning_text, c.text = decode(split.reasoning_ids).strip(), answer.strip()
        self._counters["reasoning_tokens"] += len(split.reasoning_ids)
        self._counters["answer_tokens"] += len(c.token_ids) - len(split.reasoning_ids)

    def stats(self) -> dict:
        s = dict(self._counters)
        sched = self.scheduler
        s.update(prompt_tokens=sched.num_prompt_tokens, cached_prompt_tokens=sched.num_cached_prompt_tokens,
                 computed_prompt_tokens=sched.num_prompt_tokens - sched.num_cached_prompt_tokens,
                 prefix_cache_hit_rate=(sched.num_cached_prompt_tokens / sched.num_prompt_tokens
                                        if sched.num_prompt_tokens else 0.0),
                 model_seconds=self.runner.model_seconds, preemptions=sched.num_preemptions,
                 running=len(sched.running), waiting=len(sched.waiting),
                 kv_blocks=self.kv.num_blocks, kv_blocks_free=self.kv.num_free_blocks)
        if self.lora is not None:
            s.update(lora_slots=sched.lora_slots.num_slots, lora_loads=sched.lora_slots.num_loads)
        if self.structured is not None:
            s.update(self.structured.stats())
        if self.speculative:
            st = sched.spec_stats
            s.update(spec_steps=st["steps"], spec_proposed_tokens=st["proposed"],
                     spec_accepted_tokens=st["accepted"],
                     spec_acceptance_rate=st["accepted"] / st["proposed"] if st["proposed"] else 0.0,
                     # tokens a verifying step yields: accepted proposals plus the target's own token
                     spec_mean_accepted_length=(st["accepted"] + st["steps"]) / st["steps"] if st["steps"] else 0.0,
                     spec_acceptance_per_position=[a / p if p else 0.0
                                                   for a, p in zip(st["accepted_at"], st["proposed_at"])])
        return s


class LLM:
    """vLLM's offline API: `LLM(model=...).generate(prompts, sampling_params)`."""

    def __init__(self, model: str = "smollm2-135m", **engine_args):
        self.engine = Engine(EngineConfig.from_kwargs(model=model, **engine_args))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora: str | list[str | None] | None = None) -> list[RequestOutput]:
        """prompts: a string, a token-id list, or a list of either. lora: an adapter name (loaded with
        `lora_adapters=`) for every prompt, or one name or None per prompt; None: the base model.
        Returns outputs in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        loras = list(lora) if isinstance(lora, (list, tuple)) else [lora] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"{len(loras)} lora entries for {len(prompts)} prompts")
        for i, (prompt, p, name) in enumerate(zip(prompts, params, loras)):
            self.engine.add_request(str(i), prompt, p or SamplingParams(), lora=name)
        return self._run(len(prompts), use_tqdm)

    def chat(self, conversations, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
             lora: str | list[str | None] | None = None) -> list[RequestOutput]:
        """conversations: one list of {"role", "content"} messages, or a list of them; lora as in generate."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **(chat_template_kwargs or {}))
                   for c in conversations]
        token_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(token_ids, sampling_params, use_tqdm, lora=lora)
        for out, prompt in zip(outputs, prompts):
            out.prompt = prompt
        return outputs

    def _run(self, num: int, use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        results: list[RequestOutput | None] = [None] * num
        bar = tqdm(total=num, desc="generate", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        start, tokens = time.perf_counter(), 0
        while self.engine.has_unfinished():
            for out in self.engine.step():
                results[int(out.request_id)] = out
                tokens += out.num_generated_tokens
                bar.update(1)
            if use_tqdm:
                stats = self.engine.stats()
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}",
                                hit=f"{stats['prefix_cache_hit_rate']:.0%}", refresh=False)
        bar.close()
        return results

    def stats(self) -> dict:
        return self.engine.stats()


def _error_output(request_id: str, prompt: str | None, token_ids: list[int], error: str) -> RequestOutput:
    return RequestOutput(request_id, prompt, token_ids, [CompletionOutput(0, "", [], "error")], error=error)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA device")
    return torch.device(device)


def _pick_attention_backend(name: str, device: torch.device) -> str:
    """"torch" or "triton". auto: Triton on CUDA (torch when triton will not import), torch on CPU.
    Triton on CPU runs only under the interpreter (TRITON_INTERPRET=1 before triton is imported)."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return "torch"
    try:
        from batchgen.exec import attention_triton
    except ImportError as e:
        if name == "auto":
            logger.warning("triton is not importable (%s): using the torch attention backend", e)
            return "torch"
        raise ValueError(f"attention_backend='triton' needs the triton package: {e}") from e
    if device.type != "cuda" and not attention_triton.interpreted():
        raise ValueError("attention_backend='triton' on CPU runs only under the Triton interpreter: set "
                         "TRITON_INTERPRET=1 in the environment before batchgen imports triton (slow: meant "
                         "for tests), or use attention_backend='torch'")
    return "triton"


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
