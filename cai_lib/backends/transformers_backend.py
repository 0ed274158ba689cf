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
from transformers import (AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList)

from cai_lib.backends.base import (CallStats, Chat, Generation, Sampling, choice_span, guard_lengths, make_generation,
                                   prompt_ids, record_generations, render_chat, request_seeds)
from cai_lib.backends.models import fingerprint, resolve_model
from cai_lib.backends.weights import resolve_dtype, torch_dtype

# tokens per cached prefix block in choice_logprobs: a shared opening is reused to within one block; a smaller
# block shares more but runs more, smaller forward passes
PREFIX_BLOCK = 64


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
        """log P(choice | prompt) for each choice, each prompt's shared prefix computed once per call.

        Each prompt+choice text is tokenised whole and split where base.choice_span says (the
        rule the vLLM backend shares). The prefix runs block by block (PREFIX_BLOCK tokens, batch
        of one, no padding): a block is computed once per call and its keys/values are reused by
        every prompt that starts with the same tokens, as vLLM's prefix cache reuses its blocks, so
        both A/B orders and every principle of a comparison share their common opening. A block's
        values depend only on the tokens up to its end, and the rest (the last partial block and
        the choices, batched over the choices) only on the prompt: a score does not depend on the
        batch's order or on what else is in it (tests/test_backends.py).
        """
        if not choices:
            raise ValueError("choice_logprobs needs at least one choice")
        blocks: dict[tuple[int, ...], list] = {}
        out = [self._score_prompt(p, choices, blocks) for p in prompts]
        self.stats.scoring_calls += 1
        return out

    def _prefix_cache(self, ids: list[int], blocks: dict) -> tuple[int, DynamicCache]:
        """(n, the KV cache of ids[:n]) for the largest whole number of blocks n <= len(ids), from
        `blocks` (token prefix -> that last block's per-layer keys/values), computing the missing ones."""
        B, path = PREFIX_BLOCK, []
        for end in range(B, len(ids) + 1, B):
            key = tuple(ids[:end])
            if key not in blocks:
                cache = self._cache_of(path)
                self.model(input_ids=torch.tensor([ids[end - B:end]], device=self.device), past_key_values=cache,
                           position_ids=torch.arange(end - B, end, device=self.device)[None], use_cache=True,
                           logits_to_keep=1)
                blocks[key] = [(layer.keys[..., -B:, :].clone(), layer.values[..., -B:, :].clone())
                               for layer in cache.layers]
            path.append(blocks[key])
        return len(path) * B, self._cache_of(path)

    def _cache_of(self, path: list) -> DynamicCache:
        """A fresh cache holding the blocks of `path` in order (empty for none)."""
        if not path:
            return DynamicCache(config=self.model.config)
        layers = [(torch.cat([blk[i][0] for blk in path], -2), torch.cat([blk[i][1] for blk in path], -2))
                  for i in range(len(path[0]))]
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _score_prompt(self, prompt: str, choices, blocks: dict) -> list[float]:
        """One prompt's choices: its cached prefix blocks, then the rest of prompt+choice for every choice at
        once (right-padded, on copies of the cache); the last prompt token's logits predict each span's start."""
        full, start = choice_span(self.tokenizer, prompt, choices)
        n, cache = self._prefix_cache(full[0][:start - 1], blocks)   # the token before the span runs below
        rows = [f[n:] for f in full]
        width, pad, dev = max(len(r) for r in rows), self.tokenizer.pad_token_id, self.device
        cache.batch_repeat_interleave(len(rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=dev)
        mask = torch.tensor([[1] * (n + len(r)) + [0] * (width - len(r)) for r in rows], device=dev)
        pos = torch.arange(n, n + width, device=dev)[None].expand(len(rows), -1)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True).logits
        lp = torch.log_softmax(logits.float(), -1)
        return [sum(float(lp[r, j - n - 1, f[j]]) for j in range(start, len(f))) for r, f in enumerate(full)]
