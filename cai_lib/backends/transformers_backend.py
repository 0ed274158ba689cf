"""The transformers backend: any HF causal-LM folder, on CPU (bf16 by default) or CUDA.

Per-request seeds inside one batch: Hugging Face's sampler draws from one global RNG, so a
row's sample would depend on its batch mates. `_PerRowSampler` samples each row with its own
`torch.Generator` and hands generate() a one-hot score, so generate runs greedy over our
choice. The same request and seed then give the same text whatever batch it lands in
(up to float differences from padding).

Chat rendering, tokenisation, the length guard, the choice span and the token counts are
base.py's shared rules (the vLLM backend applies the same ones; tests/test_vllm_contract.py).
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from cai_lib.backends.base import (CallStats, Chat, Generation, Sampling, choice_span, guard_lengths, make_generation,
                                   prompt_ids, record_generations, render_chat, request_seeds)
from cai_lib.backends.models import fingerprint, resolve_model
from cai_lib.backends.weights import resolve_dtype, torch_dtype


class _PerRowSampler(LogitsProcessor):
    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device):
        self.gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p, self.device = temperature, top_p, device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        if self.top_p < 1.0:
            # Nucleus: the smallest set of top tokens whose mass reaches top_p. Sorting the whole
            # vocabulary each step is slow on CPU; the top 256 nearly always hold the nucleus, and
            # when they do the result is exact. Otherwise fall back to the full sort.
            k = min(256, probs.shape[-1])
            sorted_p, idx = probs.topk(k, dim=-1)
            if bool((sorted_p.sum(-1) < self.top_p).any()):
                sorted_p, idx = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # the first token always stays
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        picks = [torch.multinomial(probs[i], 1, generator=g).item() for i, g in enumerate(self.gens)]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), torch.tensor(picks, device=scores.device)] = 0.0
        return out


class TransformersBackend:
    name = "transformers"

    def __init__(self, model_id: str = "default", *, dtype: str = "auto", device: str | None = None,
                 threads: int | None = None, batch_size: int = 8, max_prompt_tokens: int = 2048):
        if threads:
            torch.set_num_threads(int(threads))
        self.model_id = model_id
        folder = resolve_model(model_id)
        self.fingerprint = fingerprint(folder)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(self.dtype), use_safetensors=True)
        self.model = self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.stats = CallStats()

    def render_chat(self, chat: Chat, add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat, add_generation_prompt)

    # -- generation -------------------------------------------------------------------------
    def generate(self, chats: Sequence[Chat], sampling: Sampling, seeds: Sequence[int]) -> list[Generation]:
        seeds = request_seeds(chats, seeds)
        out: list[Generation] = []
        for i in range(0, len(chats), self.batch_size):
            out.extend(self._generate_batch(chats[i:i + self.batch_size], sampling, seeds[i:i + self.batch_size]))
        return out

    @torch.inference_mode()
    def _generate_batch(self, chats, sampling: Sampling, seeds) -> list[Generation]:
        texts = [self.render_chat(c) for c in chats]
        lengths = [len(prompt_ids(self.tokenizer, t)) for t in texts]
        results, keep = guard_lengths(lengths, self.max_prompt_tokens)
        if keep:
            enc = self.tokenizer([texts[i] for i in keep], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            config = GenerationConfig(do_sample=False, max_new_tokens=sampling.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id)
            procs = LogitsProcessorList()
            if sampling.temperature > 0:
                procs.append(_PerRowSampler([seeds[i] for i in keep], sampling.temperature, sampling.top_p, self.device))
            seqs = self.model.generate(**enc, generation_config=config, logits_processor=procs)
            new = seqs[:, enc["input_ids"].shape[1]:]
            eos = self.tokenizer.eos_token_id
            for row, i in enumerate(keep):
                ids = new[row].tolist()
                ended = eos in ids   # what follows EOS is padding
                results[i] = make_generation(self.tokenizer, lengths[i], ids[: ids.index(eos)] if ended else ids,
                                             sampling.stop, ended)
        record_generations(self.stats, results)
        return results  # type: ignore[return-value]

    # -- scoring ----------------------------------------------------------------------------
    @torch.inference_mode()
    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str]) -> list[list[float]]:
        """log P(choice | prompt) for each choice, one pass over each prompt's shared prefix.

        Each prompt+choice text is tokenised whole and split where base.choice_span says (the
        rule the vLLM backend shares); the prefix runs once with a KV cache, and only the few
        differing tokens run again, batched, on copies of that cache.
        """
        if not choices:
            raise ValueError("choice_logprobs needs at least one choice")
        # batch prompts of similar length (less padding); scores come back in the caller's order
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list = [None] * len(prompts)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            for j, row in zip(idx, self._score_batch([prompts[j] for j in idx], choices)):
                out[j] = row
        self.stats.scoring_calls += 1
        return out

    def _score_batch(self, prompts, choices) -> list[list[float]]:
        tok, dev, C = self.tokenizer, self.device, len(choices)
        prefixes, tails = [], []
        for p in prompts:
            full, start = choice_span(tok, p, choices)
            prefixes.append(full[0][:start])
            tails.append([f[start:] for f in full])
        # pass 1: the shared prefixes, left-padded; keep the cache and the last logits
        width = max(len(p) for p in prefixes)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        first = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first_lp = torch.log_softmax(first.logits[:, -1].float(), -1)  # predicts each tail's first token
        scores = [[float(first_lp[b, t[0]]) for t in tails[b]] for b in range(len(prompts))]
        longest = max(len(t) for ts in tails for t in ts)
        if longest > 1:
            # pass 2: every choice's remaining tokens, right-padded, on a copy of its prompt's cache
            cache = first.past_key_values
            cache.batch_repeat_interleave(C)
            rows = [t for ts in tails for t in ts]
            t_ids = torch.tensor([t + [pad] * (longest - len(t)) for t in rows], device=dev)
            t_mask = torch.tensor([[1] * len(t) + [0] * (longest - len(t)) for t in rows], device=dev)
            last = pos[:, -1].repeat_interleave(C)
            t_pos = last[:, None] + 1 + torch.arange(longest, device=dev)[None, :]
            out = self.model(input_ids=t_ids, attention_mask=torch.cat([mask.repeat_interleave(C, 0), t_mask], 1),
                             position_ids=t_pos, past_key_values=cache, use_cache=False)
            lp = torch.log_softmax(out.logits.float(), -1)
            for r, t in enumerate(rows):
                extra = sum(float(lp[r, j - 1, t[j]]) for j in range(1, len(t)))
                scores[r // C][r % C] += extra
        return scores
