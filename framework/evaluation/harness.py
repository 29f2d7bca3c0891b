"""lm-evaluation-harness on the inference engine: the ``miaotui`` model of lm-eval.

``python -m framework.eval model_dir=<dir> tasks=[...]`` (any pp x tp under torchrun) builds the engine on every
rank; rank 0 runs lm-eval's ``simple_evaluate`` in its main thread with ``MiaotuiLM`` as the model, and the engine
runs in a second thread of rank 0 (the only thread of the process that calls torch.distributed) while the other
ranks follow it as in ``framework.generate``. Every request lm-eval makes becomes an engine request, all of a call
at once, so continuous batching packs them:

- ``loglikelihood``: the context and continuation tokens go in as one prompt with ``prompt_logprobs``; the last
  stage scores every prompt row in the prefill step itself (no second pass) and returns each token's
  log-probability and the argmax, from which the continuation's sum and ``is_greedy`` follow;
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of the model's context, scored the same way;
- ``generate_until``: the engine's own sampler with the task's ``until`` strings as stop strings.

Tokenization follows lm-eval's ``TemplateLM`` (context and continuation encoded together then split, an empty
context conditioned on the EOS token), exactly as its ``hf`` model does, so the per-request log-likelihoods of
the three ways to evaluate a model (``hf`` on the export, ``local-completions`` against ``framework.serve``,
this) agree.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from framework.infer.sampler import SamplingParams
from framework.infer.scheduler import Request


@dataclass
class Finished:
    """What a request gave back: its generated tokens and text, and its prompt's per-token log-probabilities."""

    tokens: list[int]
    text: str
    prompt_logprobs: list  # entry i: (logprob of prompt token i + 1, [(id, logprob)] * k most likely)


class EngineClient:
    """Requests in from lm-eval's thread, results out from the engine's thread (its ``poll`` hook)."""

    IDLE_WAIT_S = 0.2

    def __init__(self, scheduler, tokenizer):
        self.sched, self.tok = scheduler, tokenizer
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        self._next = 0
        self._results: dict[int, Finished] = {}
        self._cv = threading.Condition()
        self.error: BaseException | None = None
        scheduler.on_finish = self._on_finish

    # -- engine thread --------------------------------------------------------------------------------------
    def _on_finish(self, seq) -> None:
        text = seq.text if seq.text is not None else self.tok.decode(seq.generated, skip_special_tokens=True)
        done = Finished(list(seq.generated), text, list(seq.prompt_logprobs))
        with self._cv:
            self._results[seq.request.index] = done
            self._cv.notify_all()

    def poll(self, idle: bool) -> bool:
        """Admit what lm-eval submitted; False once it is done and the engine has nothing left."""
        took = False
        while True:
            try:
                item = self.inbox.get(timeout=self.IDLE_WAIT_S) if idle and not took and not self.closed \
                    else self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                continue
            self.sched.add(item)
            took = True
        return not (self.closed and idle and not took)

    def fail(self, exc: BaseException) -> None:
        with self._cv:
            self.error = exc
            self._cv.notify_all()

    # -- lm-eval's thread -----------------------------------------------------------------------------------
    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Finished]:
        """Submit every request at once and wait for all of them; results in submission order."""
        first = self._next
        for ids, p in zip(prompts, params):
            self.inbox.put(Request(self._next, list(ids), p))
            self._next += 1
        want = range(first, self._next)
        with self._cv:
            while not all(i in self._results for i in want):
                if self.error is not None:
                    raise RuntimeError(f"the engine failed: {self.error}") from self.error
                self._cv.wait(timeout=1.0)
            return [self._results.pop(i) for i in want]

    def close(self) -> None:
        self.closed = True
        self.inbox.put(None)


@register_model("miaotui")
class MiaotuiLM(TemplateLM):
    """lm-eval's model interface over a running engine (see ``EngineClient``)."""

    def __init__(self, client: EngineClient, tokenizer, max_length: int, max_gen_toks: int = 256, seed: int = 0):
        super().__init__()
        self.client, self.tokenizer = client, tokenizer
        self._max_length, self.max_gen_toks, self.seed = max_length, max_gen_toks, seed

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _score(self, windows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether it is the greedy continuation) per (context,
        continuation) token pair. A pair longer than the KV slot keeps its last tokens (lm-eval's truncation)."""
        prompts, n_cont = [], []
        for context, cont in windows:
            ids = (context + cont)[-(self._max_length - 1):]  # one slot position is left for the sampled token
            prompts.append(ids)
            n_cont.append(len(cont))
        params = [SamplingParams(max_new_tokens=1, prompt_logprobs=1, seed=self.seed) for _ in prompts]
        out = []
        for ids, n, res in zip(prompts, n_cont, self.client.run(prompts, params)):
            rows = res.prompt_logprobs[len(ids) - n - 1:]  # entry i scores prompt token i + 1
            greedy = all(top and top[0][0] == tok for (_, top), tok in zip(rows, ids[len(ids) - n:]))
            out.append((float(sum(lp for lp, _ in rows)), bool(greedy)))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(context, cont) for _, context, cont in requests])
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length - 1, context_len=1)):
                windows.append((context, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._score(windows)):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params, untils = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self._max_length - max_new):]
            prompts.append(ids)
            untils.append(until)
            params.append(SamplingParams(temperature=temperature, top_p=float(kw.pop("top_p", 1.0)),
                                         max_new_tokens=max_new, seed=self.seed, stop=tuple(until)))
        out = []
        for req, until, res in zip(requests, untils, self.client.run(prompts, params)):
            text = res.text
            for s in until:  # the engine cuts at its stop strings already; lm-eval's own rule, kept exactly
                if s:
                    text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out
