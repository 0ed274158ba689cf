"""The vLLM backend (GPU). Imported only when chosen; vLLM lives in its own environment
(`make gpu-env`, requirements-gpu.txt) because it pins its own torch and transformers.

It returns what the transformers backend returns for the same tokens: both apply base.py's
shared rules (chat rendering, prompt ids, the `max_prompt_tokens` guard and its error record,
the choice span, EOS/stop-string handling and token counts, CallStats), and
tests/test_vllm_contract.py drives this adapter with stand-ins of vLLM's output types fed the
real default model's log-probs. Sampled text differs between the engines (each has its own
sampler); greedy text and scores agree.

Followed vLLM's documented API: docs.vllm.ai, the sources of vllm/outputs.py and
vllm/logprobs.py (FlatLogprobs included) from vLLM's main branch, LLM.generate as of 0.9. The
0.33 pinned in requirements-gpu.txt has not run here (no GPU was lent) and was not read:
- `LLM.generate(prompts, sampling_params, use_tqdm=False)` takes a list of prompts and one
  `SamplingParams` per prompt and returns one `RequestOutput` per prompt, in order. A prompt
  may be `{"prompt_token_ids": [...]}` (a TokensPrompt): we send ids, never text, so vLLM adds
  no BOS of its own and both engines see the same tokens.
- `RequestOutput.prompt_token_ids`, `.prompt_logprobs` (one entry per prompt token, None for
  the first; entry j maps token id -> `Logprob(logprob, rank, decoded_token)` and holds the
  actual token j with `prompt_logprobs=0`; a `FlatLogprobs` indexes the same way) and
  `.outputs: list[CompletionOutput]` with `text`, `token_ids` (which include the EOS or stop
  token that ended the sequence), `finish_reason` ("stop" | "length" | "abort") and
  `stop_reason` (the stop string, a stop token id, or None for EOS).
- Prompt log-probs are the model's raw log-softmax (vLLM's default `logprobs_mode`), not
  tempered by the request's temperature.

Inside Spark (forked Python workers), vLLM's own advice (docs "Python multiprocessing"):
- `VLLM_WORKER_MULTIPROC_METHOD=spawn`: the engine starts its worker processes by spawn,
  because forking a process in which CUDA may be initialised fails ("Cannot re-initialize CUDA
  in forked subprocess"); set before vLLM is imported, unless the environment sets it.
- one engine per Python worker and one GPU per engine: cai_lib.runtime.worker keeps one backend
  per worker; with `spark.task.resource.gpu.amount=1` only one task (one worker) uses a GPU.
- `gpu_memory_utilization` is the share of the whole GPU one engine reserves (weights + KV
  cache). Two engines on one GPU need each <= 0.45 (env CAI_VLLM_GPU_MEMORY_UTILIZATION,
  passed to executors with spark.executorEnv.*). See docs/clusters.md.
"""
from __future__ import annotations

import os
from typing import Sequence

from cai_lib.backends.base import (CallStats, Chat, Generation, Sampling, choice_span, guard_lengths, make_generation,
                                   prompt_ids, record_generations, render_chat, request_seeds)
from cai_lib.backends.models import fingerprint, resolve_model
from cai_lib.backends.weights import resolve_dtype

MULTIPROC_ENV = "VLLM_WORKER_MULTIPROC_METHOD"


def _import_vllm():
    """vLLM's `LLM` and `SamplingParams`, imported here only: the module must import on CPU machines."""
    os.environ.setdefault(MULTIPROC_ENV, "spawn")
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise ImportError(
            "the vllm backend needs vLLM, which is not installed in this environment. It is GPU-only and "
            "pins its own torch: create the GPU environment with `make gpu-env` (requirements-gpu.txt) "
            f"and run there, or use --backend transformers ({exc})") from None
    return LLM, SamplingParams


def _pin_spark_gpu() -> None:
    """Inside a Spark task, show the engine only the GPU Spark gave the task (when nothing else
    chose: CUDA_VISIBLE_DEVICES unset). Spark assigns GPU addresses but does not hide the others."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return
    try:
        from pyspark import TaskContext
    except ImportError:
        return
    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    if gpus is not None and gpus.addresses:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus.addresses)


def _option(value, env: str, default, cast):
    """An engine option: the argument, else the environment (how Spark executors get it), else the default."""
    if value is not None:
        return cast(value)
    return cast(os.environ[env]) if os.environ.get(env) else default


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_id: str = "default", *, dtype: str = "auto", gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, max_prompt_tokens: int = 2048, **_: object):
        LLM, self._SamplingParams = _import_vllm()
        self.model_id = model_id
        folder = resolve_model(model_id)
        self.fingerprint = fingerprint(folder)
        self.dtype = resolve_dtype(dtype, "cuda")  # the transformers backend's rule: bf16 unless named
        self.max_model_len = _option(max_model_len, "CAI_VLLM_MAX_MODEL_LEN", 4096, int)
        self.max_prompt_tokens = max_prompt_tokens
        if max_prompt_tokens >= self.max_model_len:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room to generate within "
                             f"max_model_len={self.max_model_len}: raise max_model_len (CAI_VLLM_MAX_MODEL_LEN) "
                             "or lower max_prompt_tokens")
        memory = _option(gpu_memory_utilization, "CAI_VLLM_GPU_MEMORY_UTILIZATION", 0.85, float)
        _pin_spark_gpu()
        self.llm = LLM(model=str(folder), dtype=self.dtype, enable_prefix_caching=True,
                       gpu_memory_utilization=memory, max_model_len=self.max_model_len)
        self.tokenizer = self.llm.get_tokenizer()
        self._end_ids = {self.tokenizer.eos_token_id, *getattr(self.tokenizer, "all_special_ids", ())}
        self.stats = CallStats()

    def render_chat(self, chat: Chat, add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat, add_generation_prompt)

    # -- generation -------------------------------------------------------------------------
    def _params(self, sampling: Sampling, seed: int, room: int):
        """One request's SamplingParams. Greedy at temperature 0 (vLLM then ignores top_p and seed)."""
        return self._SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, seed=seed,
                                    max_tokens=min(sampling.max_new_tokens, room), stop=list(sampling.stop) or None)

    def generate(self, chats: Sequence[Chat], sampling: Sampling, seeds: Sequence[int]) -> list[Generation]:
        seeds = request_seeds(chats, seeds)
        ids = [prompt_ids(self.tokenizer, self.render_chat(c)) for c in chats]
        results, keep = guard_lengths([len(x) for x in ids], self.max_prompt_tokens)
        if keep:
            outs = self.llm.generate([{"prompt_token_ids": ids[i]} for i in keep],
                                     [self._params(sampling, seeds[i], self.max_model_len - len(ids[i])) for i in keep],
                                     use_tqdm=False)
            for i, out in zip(keep, outs):
                results[i] = self._to_generation(out, len(ids[i]), sampling)
        record_generations(self.stats, results)
        return results  # type: ignore[return-value]

    def _to_generation(self, out, n_prompt: int, sampling: Sampling) -> Generation:
        """A RequestOutput as the shared rule reads it. The token that ended the sequence (EOS, or a
        stop token: finish "stop" without a stop string) is not counted, as transformers counts;
        vLLM keeps it in token_ids (vllm-project/vllm#28185, verl-project/verl#2727), and it is
        dropped only when it is that token (a special token, or the stop_reason id)."""
        c = out.outputs[0]
        if c.finish_reason not in ("stop", "length"):
            return Generation(None, n_prompt, 0, "error", f"vLLM finished the request with {c.finish_reason!r}")
        ids = list(c.token_ids)
        ended = c.finish_reason == "stop" and not isinstance(c.stop_reason, str)
        if ended and ids and (ids[-1] == c.stop_reason or ids[-1] in self._end_ids):
            ids = ids[:-1]
        return make_generation(self.tokenizer, n_prompt, ids, sampling.stop, ended)

    # -- scoring ----------------------------------------------------------------------------
    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str]) -> list[list[float]]:
        """log P(choice | prompt): the prompt log-probs of each prompt+choice over base.choice_span's
        span. Prefix caching makes each shared prompt one pass."""
        rows, starts = [], []
        for p in prompts:
            full, start = choice_span(self.tokenizer, p, choices)
            for ids in full:
                if len(ids) >= self.max_model_len:
                    raise ValueError(f"a prompt+choice has {len(ids)} tokens, over max_model_len={self.max_model_len}: "
                                     "raise max_model_len (CAI_VLLM_MAX_MODEL_LEN) or shorten the prompt")
            rows.extend(full)
            starts.extend([start] * len(full))
        params = self._SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in rows], params, use_tqdm=False)
        flat = [sum(out.prompt_logprobs[j][ids[j]].logprob for j in range(start, len(ids)))
                for out, ids, start in zip(outs, rows, starts)]
        self.stats.scoring_calls += 1
        C = len(choices)
        return [flat[i * C:(i + 1) * C] for i in range(len(prompts))]
