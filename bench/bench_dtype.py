"""Benchmark: the transformers backend in bfloat16 vs float32 on this machine's CPU.

    .venv/bin/python bench/bench_dtype.py [--prompts 16] [--tokens 48] [--threads 2]

The same model, prompts, seeds and token budgets, measured in one run for each dtype:
  generation: completion tokens/s of one batched greedy wave (what sl-generate does);
  scoring:    choice log-prob calls/s (what label-feedback does).
Reports each rate and the ratio bf16/fp32. bf16 wins only where the CPU computes in bf16
(AVX-512 BF16 or AMX); on an AVX2-only CPU torch emulates it and fp32 is the faster dtype.
The CPU flags are printed so that a reading can be matched to its hardware.
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
from cai_lib.backends.weights import cpu_bf16_support  # noqa: E402


def measure(dtype: str, prompts: list[str], tokens: int, threads: int) -> dict:
    backend = load_backend("transformers", dtype=dtype, threads=threads, batch_size=len(prompts))
    chats = [[{"role": "user", "content": p}] for p in prompts]
    sampling = Sampling(temperature=0.0, max_new_tokens=tokens)
    backend.generate(chats[:2], Sampling(temperature=0.0, max_new_tokens=4), [0, 1])  # warm-up
    t0 = time.perf_counter()
    gens = backend.generate(chats, sampling, list(range(len(chats))))
    gen_s = time.perf_counter() - t0
    completion = sum(g.completion_tokens for g in gens)
    rendered = [backend.render_chat(c) for c in chats]
    t0 = time.perf_counter()
    backend.choice_logprobs(rendered, [" (A)", " (B)"])
    score_s = time.perf_counter() - t0
    return {"dtype": dtype, "completion_tokens": completion, "gen_s": round(gen_s, 2),
            "gen_tok_s": round(completion / gen_s, 1), "score_calls_s": round(len(rendered) / score_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = [json.loads(x) for x in (ROOT / "data/demo/red_team_prompts.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows[:args.prompts]]
    bf16, fp32 = (measure(d, prompts, args.tokens, args.threads) for d in ("bfloat16", "float32"))
    print(json.dumps({"cpu_bf16": cpu_bf16_support(), "bfloat16": bf16, "float32": fp32,
                      "gen_ratio_bf16_over_fp32": round(bf16["gen_tok_s"] / fp32["gen_tok_s"], 2),
                      "score_ratio_bf16_over_fp32": round(bf16["score_calls_s"] / fp32["score_calls_s"], 2)},
                     indent=2))


if __name__ == "__main__":
    main()
