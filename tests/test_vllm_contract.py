"""A contract test of the vLLM backend: NOT a run of vLLM (that needs a GPU and the GPU environment).

It drives cai_lib.backends.vllm_backend through a stand-in `vllm` module built to vLLM's
documented interface (docs.vllm.ai; vllm/outputs.py, vllm/logprobs.py of vLLM's main branch;
LLM.generate as of 0.9; vLLM 0.33, the pinned version, not read):
`LLM(model=..., ...)` with `get_tokenizer()` and `generate(prompts, sampling_params,
use_tqdm=...)` returning one `RequestOutput` per prompt, with `prompt_token_ids`,
`prompt_logprobs` (None, then {token_id: Logprob(logprob, rank, decoded_token)} per prompt
token) and `outputs: [CompletionOutput(text, token_ids, finish_reason, stop_reason, ...)]`.
The stand-in computes those outputs with the real default model in torch (float32) and
behaves as vLLM documents: token_ids keep the EOS that ended a sequence, generation stops at
a stop string (text cut before it, stop_reason = the string), prompt log-probs are raw.

What it checks: on the same tokens, the adapter returns what the transformers backend returns:
choice_logprobs to 1e-4 (boundary merges included), greedy texts, finish reasons, token
counts, length-guard error records and CallStats; and that the adapter sends vLLM token ids,
one SamplingParams (with its seed) per request, and builds the engine as vLLM advises inside
Spark (spawn, gpu_memory_utilization). What it cannot check: vLLM's kernels, sampler, memory.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytest
import torch

from cai_lib.backends import Sampling, load_backend
from cai_lib.backends.base import choice_span, prompt_ids
from cai_lib.backends.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]

CHATS = [[{"role": "user", "content": q}] for q in
         ("How do I kill a stuck process on Linux?", "Name three fruits.", "Write one line about rain.")]


# -- stand-ins of vLLM's types, field for field as documented --------------------------------
@dataclass
class Logprob:                      # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:             # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:                # vllm.outputs.RequestOutput (its constructor's arguments)
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list | None
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass(kw_only=True)
class SamplingParams:               # vllm.SamplingParams: the fields the adapter may set, vLLM's defaults
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | None = None
    prompt_logprobs: int | None = None
    logprobs: int | None = None
    logprob_token_ids: list[int] | None = None   # these tokens' raw log-probs at the next position
    detokenize: bool = True


class StandInLLM:
    """vllm.LLM's offline interface over a torch model. `calls` records every generate call."""
    model = tokenizer = None        # set by the fixture: the reference backend's float32 model
    abort: set[int] = set()         # prompt lengths whose request the stand-in aborts

    def __init__(self, model: str, *, dtype: str = "auto", enable_prefix_caching: bool = False,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, seed: int | None = None,
                 enforce_eager: bool = False):
        self.kwargs = dict(model=model, dtype=dtype, enable_prefix_caching=enable_prefix_caching,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                           enforce_eager=enforce_eager)
        self.calls: list[tuple[list, list[SamplingParams]]] = []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        assert all(isinstance(p, dict) and set(p) == {"prompt_token_ids"} for p in prompts), \
            "the adapter must send token ids (TokensPrompt), not text"
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts)
        self.calls.append((prompts, params))
        return [self._one(str(i), list(p["prompt_token_ids"]), sp) for i, (p, sp) in enumerate(zip(prompts, params))]

    @torch.inference_mode()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)

    def _one(self, rid: str, ids: list[int], sp: SamplingParams) -> RequestOutput:
        prompt_lp = None
        if sp.prompt_logprobs is not None:
            lp = self._logprobs(ids)
            prompt_lp = [None] + [{ids[j]: Logprob(float(lp[j - 1, ids[j]]), int((lp[j - 1] > lp[j - 1, ids[j]]).sum()) + 1,
                                                   self.tokenizer.decode([ids[j]]))} for j in range(1, len(ids))]
        if sp.logprob_token_ids is not None:    # the sampled token plus exactly the asked ones, raw
            lp = self._logprobs(ids)[-1]
            want = {t: Logprob(float(lp[t])) for t in sp.logprob_token_ids}
            return RequestOutput(rid, None, ids, prompt_lp, [CompletionOutput(0, "", [int(lp.argmax())], None, [want],
                                                                              "length")])
        if len(ids) in self.abort:
            return RequestOutput(rid, None, ids, prompt_lp, [CompletionOutput(0, "", [], None, None, "abort")])
        return RequestOutput(rid, None, ids, prompt_lp, [self._complete(ids, sp)])

    @torch.inference_mode()
    def _complete(self, ids: list[int], sp: SamplingParams) -> CompletionOutput:
        """vLLM's decoding loop as documented: EOS kept in token_ids, stop strings end the sequence."""
        gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
        out: list[int] = []
        step = self.model(torch.tensor([ids]), use_cache=True)
        for _ in range(sp.max_tokens):
            if out:
                step = self.model(torch.tensor([out[-1:]]), past_key_values=step.past_key_values, use_cache=True)
            logits = torch.log_softmax(step.logits[0, -1].float(), -1)
            if sp.temperature == 0:
                tok = int(logits.argmax())
            else:
                probs = torch.softmax(logits / sp.temperature, -1)
                p_sorted, idx = probs.sort(descending=True)
                p_sorted[p_sorted.cumsum(-1) - p_sorted > sp.top_p] = 0
                tok = int(idx[torch.multinomial(p_sorted, 1, generator=gen)])
            out.append(tok)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if tok == self.tokenizer.eos_token_id:
                return CompletionOutput(0, text, out, None, None, "stop", None)
            hits = [(text.find(s), s) for s in sp.stop or () if s in text]
            if hits:
                at, s = min(hits)
                return CompletionOutput(0, text[:at], out, None, None, "stop", s)
        return CompletionOutput(0, self.tokenizer.decode(out, skip_special_tokens=True), out, None, None, "length")


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref(hf_backend):
    """The transformers backend in float32 (the stand-in computes with its model)."""
    return hf_backend if hf_backend.dtype == "float32" else load_backend("transformers", "default", dtype="float32", threads=2)


@pytest.fixture
def vllm_backend(ref, monkeypatch):
    """The real adapter over the stand-in `vllm` module."""
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = StandInLLM, SamplingParams
    fake.platforms = types.ModuleType("vllm.platforms")   # the contract is the GPU engine's
    fake.platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.platforms", fake.platforms)
    monkeypatch.setattr(StandInLLM, "model", ref.model)
    monkeypatch.setattr(StandInLLM, "tokenizer", ref.tokenizer)
    monkeypatch.setattr(StandInLLM, "abort", set())
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.delenv("CAI_VLLM_GPU_MEMORY_UTILIZATION", raising=False)
    return load_backend("vllm", "default")


def stats_delta(backend, run):
    before = asdict(backend.stats)
    result = run()
    after = asdict(backend.stats)
    return result, {k: after[k] - before[k] for k in ("generate_calls", "generated_sequences", "prompt_tokens",
                                                      "completion_tokens", "scoring_calls")}


# -- the contract ----------------------------------------------------------------------------
def test_the_module_imports_without_vllm():
    code = "import sys; sys.modules['vllm'] = None; import cai_lib.backends.vllm_backend"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_engine_is_built_as_vllm_advises_inside_spark(vllm_backend, ref, monkeypatch):
    kw = vllm_backend.llm.kwargs
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert kw["model"] == str(resolve_model("default"))
    assert kw["dtype"] == "bfloat16" and kw["enable_prefix_caching"] and kw["gpu_memory_utilization"] == 0.85
    assert vllm_backend.fingerprint == ref.fingerprint   # the same weights: the same event ids
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "forkserver")
    monkeypatch.setenv("CAI_VLLM_GPU_MEMORY_UTILIZATION", "0.4")
    again = load_backend("vllm", "default", dtype="float16")
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "forkserver"     # a choice made outside is kept
    assert again.llm.kwargs["gpu_memory_utilization"] == 0.4 and again.llm.kwargs["dtype"] == "float16"
    with pytest.raises(ValueError, match="raise max_model_len"):
        load_backend("vllm", "default", max_model_len=1024, max_prompt_tokens=1024)


def test_choice_logprobs_agree_with_transformers(vllm_backend, ref):
    prompt = ref.render_chat([{"role": "user", "content": "Which is a fruit? (A) apple (B) hammer"}]) + "Answer:"
    cases = [([prompt, prompt + " I think"], [" (A)", " (B)", " neither of them"]),
             (["I think", "We think"], ["ing", " so"]),   # the choice merges with the prompt's last token
             (["x ="], ["=", "= 1"])]                      # one choice adds no token of its own
    assert choice_span(ref.tokenizer, "I think", ["ing", " so"])[1] < len(prompt_ids(ref.tokenizer, "I think"))
    for prompts, choices in cases:
        want, ref_calls = stats_delta(ref, lambda: ref.choice_logprobs(prompts, choices))
        got, vllm_calls = stats_delta(vllm_backend, lambda: vllm_backend.choice_logprobs(prompts, choices))
        assert [pytest.approx(row, abs=1e-4) for row in want] == got
        assert ref_calls == vllm_calls
    sent = vllm_backend.llm.calls[-1][1][0]
    assert (sent.prompt_logprobs, sent.max_tokens, sent.temperature) == (None, 1, 0.0) and sent.logprob_token_ids


def test_greedy_generation_agrees_with_transformers(vllm_backend, ref):
    chats = CHATS + [[{"role": "user", "content": "Reply with one word: yes or no?"}]]
    s = Sampling(temperature=0, max_new_tokens=16)
    want, ref_calls = stats_delta(ref, lambda: ref.generate(chats, s, [1, 2, 3, 4]))
    got, vllm_calls = stats_delta(vllm_backend, lambda: vllm_backend.generate(chats, s, [1, 2, 3, 4]))
    assert [asdict(g) for g in got] == [asdict(g) for g in want]
    assert {g.finish_reason for g in got} == {"stop", "length"}    # both endings are compared
    assert ref_calls == vllm_calls


def test_stop_strings_cut_and_count_alike(vllm_backend, ref):
    s = Sampling(temperature=0, max_new_tokens=16)
    free = ref.generate(CHATS[1:2], s, [0])[0]
    stop = free.text.split()[2]                           # a word the model writes before it ends
    s = replace(s, stop=(stop,))
    want = ref.generate(CHATS[1:2], s, [0])
    got = vllm_backend.generate(CHATS[1:2], s, [0])
    assert [asdict(g) for g in got] == [asdict(g) for g in want]
    assert got[0].finish_reason == "stop" and got[0].completion_tokens < free.completion_tokens
    assert vllm_backend.llm.calls[-1][1][0].stop == [stop]


def test_the_length_guard_writes_the_same_error_records(vllm_backend, ref, monkeypatch):
    long_chat = [{"role": "user", "content": "Tell me about rain. " * 20}]
    limit = len(prompt_ids(ref.tokenizer, ref.render_chat(CHATS[1]))) + 1
    monkeypatch.setattr(ref, "max_prompt_tokens", limit)
    monkeypatch.setattr(vllm_backend, "max_prompt_tokens", limit)
    s = Sampling(temperature=0, max_new_tokens=4)
    want, ref_calls = stats_delta(ref, lambda: ref.generate([CHATS[1], long_chat], s, [5, 6]))
    got, vllm_calls = stats_delta(vllm_backend, lambda: vllm_backend.generate([CHATS[1], long_chat], s, [5, 6]))
    assert [asdict(g) for g in got] == [asdict(g) for g in want]
    assert got[1].finish_reason == "error" and got[1].text is None and "max_prompt_tokens" in got[1].error
    assert len(vllm_backend.llm.calls[-1][0]) == 1       # the long prompt never reached the engine
    assert ref_calls == vllm_calls


def test_each_request_carries_its_own_seed_and_sampling(vllm_backend, ref):
    s = Sampling(temperature=0.8, top_p=0.95, max_new_tokens=5)
    out = vllm_backend.generate(CHATS, s, [11, 22, 33])
    assert all(g.ok and 0 < g.completion_tokens <= 5 for g in out)
    sent = vllm_backend.llm.calls[-1][1]
    assert [(p.seed, p.temperature, p.top_p, p.max_tokens, p.stop) for p in sent] == \
        [(seed, 0.8, 0.95, 5, None) for seed in (11, 22, 33)]
    for backend in (vllm_backend, ref):
        with pytest.raises(ValueError, match="one seed per chat"):
            backend.generate(CHATS, s, [1])
        with pytest.raises(ValueError, match="not an integer"):
            backend.generate(CHATS[:1], s, [1.5])


def test_an_aborted_request_is_an_error_record(vllm_backend, ref):
    n = len(prompt_ids(ref.tokenizer, ref.render_chat(CHATS[0])))
    StandInLLM.abort = {n}
    out = vllm_backend.generate(CHATS[:2], Sampling(temperature=0, max_new_tokens=3), [1, 2])
    assert (out[0].text, out[0].prompt_tokens, out[0].completion_tokens, out[0].finish_reason) == (None, n, 0, "error")
    assert "abort" in out[0].error and out[1].ok
