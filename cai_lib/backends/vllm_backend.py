"""The vLLM backend (GPU). Imported only when chosen; vLLM lives in its own environment
(`make gpu-env`, requirements-gpu.txt) because it pins its own torch and transformers.

Same outputs as the transformers backend: chats are rendered with the model's chat template,
each request carries its own seed (vLLM supports per-request seeds), and `choice_logprobs`
reads the prompt log-probs of prompt+choice (prefix caching makes the shared prompt one pass).
"""
from __future__ import annotations

from typing import Sequence

from cai_lib.backends.base import CallStats, Chat, Generation, Sampling, check_lengths, cut_at_stop
from cai_lib.backends.models import fingerprint, resolve_model


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_id: str = "default", *, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 max_model_len: int = 4096, **_: object):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError(
                "the vllm backend needs vLLM, which is not installed in this environment. It is GPU-only and "
                "pins its own torch: create the GPU environment with `make gpu-env` (requirements-gpu.txt) "
                f"and run there, or use --backend transformers ({exc})") from None
        self._SamplingParams = SamplingParams
        self.model_id = model_id
        folder = resolve_model(model_id)
        self.fingerprint = fingerprint(folder)
        self.llm = LLM(model=str(folder), dtype=dtype, enable_prefix_caching=True,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
        self.tokenizer = self.llm.get_tokenizer()
        self.stats = CallStats()

    def render_chat(self, chat: Chat, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)

    def generate(self, chats: Sequence[Chat], sampling: Sampling, seeds: Sequence[int]) -> list[Generation]:
        check_lengths(chats, seeds)
        prompts = [self.render_chat(c) for c in chats]
        params = [self._SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                       max_tokens=sampling.max_new_tokens, seed=int(s),
                                       stop=list(sampling.stop) or None) for s in seeds]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            text, _ = cut_at_stop(c.text, sampling.stop)
            results.append(Generation(text.strip(), len(o.prompt_token_ids), len(c.token_ids),
                                      "length" if c.finish_reason == "length" else "stop"))
        self.stats.generate_calls += 1
        self.stats.generated_sequences += len(results)
        self.stats.completion_tokens += sum(r.completion_tokens for r in results)
        return results

    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str]) -> list[list[float]]:
        tok = self.tokenizer
        texts, spans = [], []
        for p in prompts:
            n_prompt = len(tok(p, add_special_tokens=False).input_ids)
            for c in choices:
                ids = tok(p + c, add_special_tokens=False).input_ids
                texts.append({"prompt_token_ids": ids})
                spans.append(min(n_prompt, len(ids) - 1))
        params = self._SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate(texts, params, use_tqdm=False)
        flat = []
        for o, start in zip(outs, spans):
            ids = o.prompt_token_ids
            flat.append(sum(o.prompt_logprobs[j][ids[j]].logprob for j in range(start, len(ids))))
        self.stats.scoring_calls += 1
        C = len(choices)
        return [flat[i * C:(i + 1) * C] for i in range(len(prompts))]
