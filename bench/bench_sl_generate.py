"""Benchmark: sl-generate vs the bare backend vs a per-conversation sequential chain.

    .venv/bin/python bench/bench_sl_generate.py [--prompts 32] [--rounds 1] [--tokens 48] [--batch-size 16]

The same red-team prompts, model, templates, seeds and token budgets, measured in one run:
  A. `sl-generate` as users run it: the Spark plane (anti-joins, executors generating, one idempotent
     delta-spark append per chunk, resume bookkeeping), its worker's model already loaded;
  B. the bare backend: the same waves (all answers, then all critiques, then all revisions),
     batched, in this process, no Spark and no lake;
  C. a sequential chain: answer -> critique -> revision one conversation at a time, batch size 1,
     as simple scripts do.
A and B run --repeats times, alternating, each A on a fresh lake; reports completion tokens/s of each
(median, and the spread over the repeats) and the ratios A/B (goal >= 0.9) and A/C (goal >= 5).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CAI_MODEL_CACHE", str(ROOT / ".cache/models"))

from cai_lib.backends import load_backend  # noqa: E402
from cai_lib.backends.models import model_fingerprint  # noqa: E402
from cai_lib.constitution.load import load_constitution  # noqa: E402
from cai_lib.constitution.templates import parse_output  # noqa: E402
from cai_lib.lake.tables import Lake  # noqa: E402
from cai_lib.runtime.session import get_spark  # noqa: E402
from cai_lib.sl.chain import SLContext, plan_chain, step_chat, step_inputs  # noqa: E402
from jobs.ingest import IngestConfig  # noqa: E402
from jobs.ingest import run as ingest  # noqa: E402
from jobs.sl_generate import SLGenerateConfig  # noqa: E402
from jobs.sl_generate import run as sl_generate  # noqa: E402


def make_lake(folder: Path, n: int) -> Path:
    rows = [json.loads(x) for x in (ROOT / "data/demo/red_team_prompts.jsonl").read_text().splitlines()[:n]]
    src = folder / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(None, IngestConfig(lake=str(folder / "lake"), source=str(src), kind="red_team", test_fraction=0.0))
    return folder / "lake"


def bare_waves(backend, cfg: SLGenerateConfig, lake: Path, batched: bool) -> tuple[int, float]:
    """The same chains as sl-generate, straight on the backend: wave by wave in the job's batches (its model
    calls: each wave sorted by `input_len` and event id, cut in batch_size), or one chain at a time."""
    ctx = SLContext(load_constitution(cfg.constitution), cfg.base_model, model_fingerprint(cfg.backend, cfg.base_model),
                    cfg.backend, cfg.settings())
    prompts = Lake(lake).read("prompts").to_pylist()
    plans = {p["prompt_id"]: plan_chain(ctx, p["prompt_id"], p["kind"]) for p in prompts}
    text_of = {p["prompt_id"]: p["text"] for p in prompts}
    texts, tokens = {}, 0
    t0 = time.perf_counter()
    if batched:
        for wave in range(2 * cfg.rounds + 1):
            items = sorted(((pid, i, s) for pid, ch in plans.items() for i, s in enumerate(ch) if s.wave == wave),
                           key=lambda it: (input_len(plans[it[0]], it[1], text_of[it[0]], texts), it[2].event_id))
            for at in range(0, len(items), cfg.batch_size):   # the job's batches: its model calls
                by_sampling: dict[str, list] = {}
                for it in items[at:at + cfg.batch_size]:
                    by_sampling.setdefault(it[2].sampling, []).append(it)
                for group in by_sampling.values():
                    chats = [step_chat(ctx, plans[pid], i, text_of[pid], texts) for pid, i, _ in group]
                    gens = backend.generate(chats, _sampling(group[0][2]), [s.seed for _, _, s in group])
                    for (_, _, s), g in zip(group, gens):
                        texts[s.event_id] = parse_output(s.kind, g.text)
                        tokens += g.completion_tokens
    else:
        for pid, chain in plans.items():
            for i, s in enumerate(chain):
                g = backend.generate([step_chat(ctx, chain, i, text_of[pid], texts)], _sampling(s), [s.seed])[0]
                texts[s.event_id] = parse_output(s.kind, g.text)
                tokens += g.completion_tokens
    return tokens, time.perf_counter() - t0


def input_len(chain, i: int, prompt: str, texts: dict) -> int:
    """What the plane sorts a wave's steps by before cutting its batches (spark_chain.wave_inputs): the
    characters of the prompt, the answer the step works on and the critique a revision follows."""
    response, critique = step_inputs(chain, i)
    return len(prompt) + len(texts.get(response) or "") + len(texts.get(critique) or "")


def _sampling(step):
    from cai_lib.backends import Sampling
    d = json.loads(step.sampling)
    return Sampling(d["temperature"], d["top_p"], d["max_new_tokens"], tuple(d["stop"]))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=48, help="max new tokens of every step")
    ap.add_argument("--batch-size", type=int, default=SLGenerateConfig.batch_size,
                    help="default: the job's own (%(default)s), so A is what a user runs")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    spark = get_spark("local[1]", "cai-bench", delta=True)
    tmp = Path(tempfile.mkdtemp(prefix="cai-bench-"))
    cfg = lambda lake: SLGenerateConfig(  # noqa: E731
        lake=str(lake), params="/nonexistent.yaml", rounds=a.rounds, batch_size=a.batch_size,
        batches_per_commit=4, answer_max_new_tokens=a.tokens, critique_max_new_tokens=a.tokens,
        revision_max_new_tokens=a.tokens, constitution=str(ROOT / "constitutions/default.yaml"))
    # warm-up: the Spark worker loads its model once, as in any real run after the first batch
    (tmp / "warm").mkdir()
    sl_generate(spark, cfg(make_lake(tmp / "warm", 1)))
    backend = load_backend("transformers", "default", threads=2, batch_size=a.batch_size)
    bare_waves(backend, cfg(tmp / "warm" / "lake"), tmp / "warm" / "lake", batched=True)   # B warmed up alike
    runs_a, runs_b = [], []
    for i in range(a.repeats):
        (tmp / f"a{i}").mkdir()
        lake_a = make_lake(tmp / f"a{i}", a.prompts)
        t0 = time.perf_counter()
        out = sl_generate(spark, cfg(lake_a))
        runs_a.append((out["completion_tokens"], time.perf_counter() - t0))
        runs_b.append(bare_waves(backend, cfg(lake_a), lake_a, batched=True))
    c_tok, c_s = bare_waves(backend, cfg(lake_a), lake_a, batched=False)
    rate = lambda t, s: t / s  # noqa: E731
    rates_a, rates_b = sorted(rate(*r) for r in runs_a), sorted(rate(*r) for r in runs_b)
    ra, rb, rc = rates_a[len(rates_a) // 2], rates_b[len(rates_b) // 2], rate(c_tok, c_s)
    a_tok, a_s = min(runs_a, key=lambda r: abs(rate(*r) - ra))   # the median run of each
    b_tok, b_s = min(runs_b, key=lambda r: abs(rate(*r) - rb))
    n = out["generations"]
    print(f"\nSL-CAI benchmark: {a.prompts} red-team prompts, {a.rounds} round(s), {n} generations, "
          f"<= {a.tokens} new tokens each, batch {a.batch_size}, default model, 2 torch threads")
    print(f"{'run':<38}{'tokens':>8}{'seconds':>9}{'tok/s':>8}")
    for name, t, s, r in (("A sl-generate (Spark + Delta)", a_tok, a_s, ra),
                          ("B bare backend, batched waves", b_tok, b_s, rb),
                          ("C sequential chain, batch 1", c_tok, c_s, rc)):
        print(f"{name:<38}{t:>8}{s:>9.1f}{r:>8.1f}")
    print(f"spread over {a.repeats} repeats, tok/s: A {rates_a[0]:.1f}-{rates_a[-1]:.1f}, "
          f"B {rates_b[0]:.1f}-{rates_b[-1]:.1f}; CPU: {cpu_model()}")
    print(f"ratio A/B = {ra / rb:.2f}  (goal >= 0.9: the pipeline's overhead over the bare batched backend)")
    print(f"ratio A/C = {ra / rc:.2f}  (goal >= 5: batching across prompts vs one conversation at a time)")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
