"""Evaluate base, SL-CAI and RL-CAI on held-out prompts: harmlessness, refusals, helpfulness, Elo.

    cai evaluate --lake lake
    cai evaluate --policies base=default sl_cai=cai-sl:2 rl_cai=cai-rl@champion --splits test

Each model answers the held-out (split=test) red-team and benign prompts; answers are
`generation_events` (kind eval_response, deterministic ids), so a rerun generates nothing.
Per model: mean PM score on red-team answers (harmlessness) and on benign answers (a
helpfulness proxy), refusal rate on red-team prompts (vs engaged answers), over-refusal on
benign prompts. The feedback model compares every pair of models on every prompt in both
orders (one comparison principle per prompt, seeded); the order-debiased preferences give an
Elo table (Bradley-Terry, base = 1000). Every headline figure carries its 95% interval
(`*_ci`: a seeded bootstrap over prompts for PM scores and Elo, Wilson for refusal rates), and
the per-prompt PM scores are kept so that `cai promote` can test a paired difference.
Writes metrics JSON for `dvc metrics` and PNG plots. The answers are made on the Spark-native data
plane (planned in the executors, pending by anti-join, generated and appended by the executors with
delta-spark).

Failures are part of the result: each model's `failed` and `gave_up` answers (after
max_attempts failures; `--max-attempts N` retries them) and the `comparisons_failed` are in
the metrics JSON and the summary line, and a model with fewer answers is judged on fewer
prompts. Exit status: 1 when more than max_failed_fraction of this run's answers (failed or
given up) or of its comparisons failed, after the metrics are written.
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

from cai_lib.backends import Sampling
from cai_lib.backends.models import model_fingerprint
from cai_lib.config import RegistryConfig, opt
from cai_lib.constitution.load import load_constitution
from cai_lib.constitution.templates import DEFAULT_TEMPLATES, effective_templates, template_sha
from cai_lib.feedback.elo import elo_intervals, elo_table
from cai_lib.feedback.label_metrics import debias, normalise_choice
from cai_lib.feedback.labels import ANSWER_PREFIX, CHOICES, conversation_text, feedback_chat, pick_principles
from cai_lib.files import write_json
from cai_lib.ids import derive_seed, stable_id
from cai_lib.lake.spark_delta import open_lake
from cai_lib.quality import signals as quality
from cai_lib.quality.stats import bootstrap_interval, wilson_interval
from cai_lib.runtime.scoring import score_on_spark
from cai_lib.runtime.tasks import new_job_run_id
from jobs.common import MAX_NEW_TOKENS, SPLITS, TEMPERATURE, Failures, GenerationConfig, spark_job_main

EVAL_TEMPLATE_SHA = template_sha(DEFAULT_TEMPLATES, names=("initial",))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@dataclass
class EvaluateConfig(GenerationConfig, RegistryConfig):
    policies: list = opt(["base=default", "sl_cai=cai-sl", "rl_cai=cai-rl"],
                         "NAME=MODEL policies to evaluate (first = Elo anchor)")
    reward_model: str = opt("cai-pm", "the preference model scoring harmlessness / helpfulness")
    device: str | None = opt(None, "where the reward model (PM) scores the answers: cpu | cuda | cuda:N | auto; "
                                   "None/auto = cuda when available, else cpu (as the train-* jobs' --device)")
    feedback_model: str = opt("default", "the model comparing answers for Elo")
    constitution: str = opt("constitutions/default.yaml", "its comparison principles judge the Elo comparisons")
    splits: list = opt(["test"], "held-out prompts (ingest's split)", choices=SPLITS)
    max_new_tokens: int = opt(64, "answer length cap", **MAX_NEW_TOKENS)
    temperature: float = opt(0.0, "0 = greedy: the same model gives the same answers", **TEMPERATURE)
    metrics: str = opt("metrics/evaluate.json", "metrics JSON (dvc metrics)")
    plot: str = opt("metrics/evaluate.png", "bar charts of the per-model metrics")

    def __post_init__(self):
        from cai_lib.training.policy import resolve_device   # lazy: the module loads no torch until run
        super().__post_init__()
        resolve_device(self.device)   # before Spark starts: `--device cuda` without a GPU fails at once

    def backend_models(self) -> list[str]:
        return [self.feedback_model] + [ref for _, ref in self.named_policies()]

    def named_policies(self) -> list[tuple[str, str]]:
        out = []
        for item in self.policies:
            name, sep, ref = str(item).partition("=")
            if not sep or not name or not ref:
                raise ValueError(f"--policies wants NAME=MODEL items (e.g. base=default), got {item!r}")
            out.append((name, ref))
        return out


def answer_id(prompt_id: str, fingerprint: str, sampling_json: str, seed: int) -> str:
    return stable_id("eval_response", parents=[prompt_id], model=fingerprint, template=EVAL_TEMPLATE_SHA,
                     sampling=sampling_json, seed=seed)


def answer_partition(batches, *, seed: int, fingerprint: str, sampling_json: str):
    """mapInArrow body: (prompt_id, text) rows -> the plan row of each one's eval answer (`answers`' ids)."""
    import pyarrow as pa

    from cai_lib.feedback.pairs import SAMPLE_SCHEMA
    for batch in batches:
        rows = []
        for pid, text in zip(batch.column("prompt_id").to_pylist(), batch.column("text").to_pylist()):
            s = derive_seed(seed, pid, "eval_response")
            rows.append({"event_id": answer_id(pid, fingerprint, sampling_json, s), "kind": "eval_response",
                         "prompt_id": pid, "parent_id": None, "round": 0, "principle_id": None, "seed": s,
                         "sampling": sampling_json, "prompt_text": text, "input_len": len(text)})
        if rows:
            yield pa.RecordBatch.from_pylist(rows, schema=SAMPLE_SCHEMA)


def answers(spark, lake, cfg, ref: str, prompts_df, job_run_id: str,
            progress=None) -> tuple[str, dict[str, str], int, Failures]:
    """(lineage label, {prompt_id: answer}, model calls, failures) for one model, on the Spark-native data
    plane: planned in the executors, pending by anti-join (only what is missing is generated), the executors
    generate and append; only the answers themselves come back (the PM scores them here)."""
    import functools

    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    from cai_lib.feedback.pairs import SAMPLE_SCHEMA, sample_chat
    from cai_lib.lake.locks import job_lock
    from cai_lib.registry.models import backend_model
    from cai_lib.runtime import spark_plane as plane
    label, load_as = backend_model(cfg, ref)
    fp = model_fingerprint(cfg.backend, load_as)
    sampling_json = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens).to_json()
    constants = {"constitution_id": "none", "constitution_sha": "none", "model_id": label, "model_fingerprint": fp,
                 "backend": cfg.backend, "template_sha": EVAL_TEMPLATE_SHA}
    plan = functools.partial(answer_partition, seed=cfg.seed, fingerprint=fp, sampling_json=sampling_json)
    planned = prompts_df.select("prompt_id", "text").mapInArrow(plan, from_arrow_schema(SAMPLE_SCHEMA))
    planned = planned.localCheckpoint(eager=True)
    with job_lock(cfg.lake, "evaluate", job_run_id) as lock:
        ctx = plane.Plane(spark, lake, cfg.backend_spec(load_as), constants, job_run_id, cfg.batch_size,
                          cfg.batches_per_commit, cfg.chunk_seconds, progress, exclusive=lock is not None)
        stats, gave_up, tries = plane.run_step(ctx, planned, kind="eval_response", plan_id=f"{job_run_id}/{label}",
                                               make_chat=sample_chat, max_attempts=cfg.max_attempts,
                                               what=f"answers of {label}")
    done = plane.successful(lake.df("generation_events").where(F.col("kind") == "eval_response"))
    out = {r["prompt_id"]: r["text"] for r in done.join(planned.select("event_id", "prompt_id"), "event_id").collect()}
    return label, out, stats.model_calls, Failures.of(f"answers of {label}", stats, gave_up, cfg.max_attempts, tries)


def elo_comparisons(spark, cfg, constitution, texts: dict[str, str], outs: dict[str, dict[str, str]]):
    """([(i, j, P(i's answer better))] per prompt and model pair, debiased over both orders; failures;
    the same comparisons by prompt, for the Elo intervals)."""
    template = effective_templates(constitution)["comparison"]
    items, keys, pids = [], [], []
    for pid, (a, b) in itertools.product(sorted(texts), itertools.combinations(outs, 2)):
        if pid not in outs[a] or pid not in outs[b]:
            continue
        principle = pick_principles(constitution, stable_id("elo", prompt=pid, a=a, b=b), 1, cfg.seed)[0]
        ptext = constitution.comparison_principle(principle).text
        for first, second in ((a, b), (b, a)):
            items.append((feedback_chat(template, conversation_text(texts[pid]), ptext,
                                        outs[first][pid], outs[second][pid]), ANSWER_PREFIX))
        keys.append((a, b))
        pids.append(pid)
    spec = cfg.backend_spec(cfg.feedback_model)
    scores, _ = score_on_spark(spark, items, spec, CHOICES, batch_size=cfg.batch_size)
    comps, fails = debiased_comparisons(keys, scores)
    kept = [pid for n, pid in enumerate(pids) if not (scores[2 * n]["error"] or scores[2 * n + 1]["error"])]
    by_prompt: dict[str, list[tuple]] = {}
    for pid, comp in zip(kept, comps):
        by_prompt.setdefault(pid, []).append(comp)
    return comps, fails, by_prompt


def debiased_comparisons(keys: list[tuple[str, str]], scores: list[dict]) -> tuple[list[tuple], Failures]:
    """(a, b, P(a better)) from the two orders' scores of each comparison; a failed order fails the
    comparison (counted, with its first error: it is left out of the Elo fit, not guessed)."""
    comps, fails = [], Failures("comparisons", attempted=len(keys))
    for n, (a, b) in enumerate(keys):
        ab, ba = scores[2 * n], scores[2 * n + 1]
        if ab["error"] or ba["error"]:
            fails.failed += 1
            fails.first_error = fails.first_error or ab["error"] or ba["error"]
            continue
        comps.append((a, b, debias(normalise_choice(ab["logprob_a"], ab["logprob_b"]),
                                   normalise_choice(ba["logprob_a"], ba["logprob_b"]))))
    return comps, fails


def model_metrics(label: str, out: dict, fails, scores: dict, kind: dict, seed: int) -> dict:
    """One policy's figures from its answers `out` (prompt id -> text) and their PM `scores`: refusal rates
    (Wilson intervals) and mean PM scores (bootstrap intervals) on red-team and benign prompts, per-prompt
    scores for cai promote's paired tests, and the three headline names the report and promote read."""
    ids = sorted(out)
    m = {"model": label, "answers": len(out), "failed": fails.failed, "gave_up": fails.gave_up}
    for k, tag in (("red_team", "red_team"), ("helpful", "benign")):
        sel = [i for i in ids if kind[i] == k]
        m[f"n_{tag}"] = len(sel)
        if sel:
            refused = sum(quality.is_refusal(out[i]) for i in sel)
            m[f"refusal_rate_{tag}"] = refused / len(sel)
            m[f"refusal_rate_{tag}_ci"] = list(wilson_interval(refused, len(sel)))
            m[f"pm_score_{tag}"] = sum(scores[i] for i in sel) / len(sel)
            m[f"pm_score_{tag}_ci"] = list(bootstrap_interval([scores[i] for i in sel], _mean, seed=seed))
            m[f"pm_scores_{tag}"] = {i: scores[i] for i in sel}   # per prompt: paired tests in cai promote
    for key, src in (("harmlessness", "pm_score_red_team"), ("helpfulness_proxy", "pm_score_benign"),
                     ("over_refusal", "refusal_rate_benign")):
        m[key], m[f"{key}_ci"] = m.get(src), m.get(f"{src}_ci")
    m["engaged_rate_red_team"] = None if "refusal_rate_red_team" not in m else 1 - m["refusal_rate_red_team"]
    return m


def run(spark, cfg: EvaluateConfig, progress=None) -> dict:
    from cai_lib.registry.models import resolve_weights
    from cai_lib.training.pm_model import PreferenceModel
    from cai_lib.training.policy import resolve_device
    device = resolve_device(cfg.device)   # `--device cuda` without a GPU fails before any answer is generated
    from cai_lib.runtime.spark_plane import selected_prompts
    lake = open_lake(cfg.lake, spark)
    named = cfg.named_policies()
    prompts_df = selected_prompts(lake, cfg.splits, cfg.limit).where("chosen").select("prompt_id", "text", "kind")
    prompts_df = prompts_df.localCheckpoint(eager=True)
    rows = [r.asDict() for r in prompts_df.collect()]   # the held-out prompts: the PM scores their answers here
    if not rows:
        raise ValueError(f"no {'/'.join(cfg.splits)} prompts in {lake.root}: ingest with test_fraction > 0")
    texts = {r["prompt_id"]: r["text"] for r in rows}
    kind = {r["prompt_id"]: r["kind"] for r in rows}
    pm_label, pm_dir = resolve_weights(cfg.reward_model, cfg)
    pm = PreferenceModel.load(pm_dir, device=str(device))
    job_run_id = new_job_run_id()
    outs, report, calls, failures = {}, {}, 0, []
    for name, ref in named:
        label, out, n, fails = answers(spark, lake, cfg, ref, prompts_df, job_run_id, progress)
        calls += n
        outs[name] = out
        failures.append(fails)
        ids = sorted(out)
        scores = dict(zip(ids, pm.score_pairs([texts[i] for i in ids], [out[i] for i in ids]).tolist())) if ids else {}
        m = model_metrics(label, out, fails, scores, kind, cfg.seed)
        report[name] = m
        if progress:
            progress(f"{name} ({label}): " + ", ".join(
                f"{k}={v:.3f}" + (" [{:.3f}, {:.3f}]".format(*m[f"{k}_ci"]) if m.get(f"{k}_ci") else "")
                for k, v in m.items() if isinstance(v, float) and k != "engaged_rate_red_team"))
    comps, comp_fails, by_prompt = elo_comparisons(spark, cfg, load_constitution(cfg.constitution), texts, outs)
    elo = elo_table(comps, anchor=named[0][0]) if comps else {}
    elo_ci = elo_intervals(by_prompt, named[0][0], seed=cfg.seed) if comps else {}
    failed, gave_up = sum(f.failed for f in failures), sum(f.gave_up for f in failures)
    body = {"models": report, "elo": elo, "elo_ci": elo_ci, "interval": "95% (bootstrap over prompts; Wilson for rates)",
            "comparisons": len(comps), "comparisons_failed": comp_fails.failed,
            "prompts": len(texts), "reward_model": pm_label, "model_calls": calls,
            "answers_failed": failed, "answers_gave_up": gave_up}
    write_json(cfg.metrics, body)
    plot(report, elo, elo_ci, cfg.plot)
    return {"prompts": len(texts), "comparisons": len(comps), "model_calls": calls, "failed": failed,
            "gave_up": gave_up, "comparisons_failed": comp_fails.failed, "failures": [*failures, comp_fails],
            **{f"{n}_{k}": v for n, m in report.items() for k, v in m.items()
               if k in ("harmlessness", "over_refusal", "refusal_rate_red_team")},
            **{f"elo_{n}": v for n, v in elo.items()}}


def plot(report: dict, elo: dict, elo_ci: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report)
    panels = [("harmlessness", "PM score, red-team"), ("helpfulness_proxy", "PM score, benign"),
              ("refusal_rate_red_team", "refusal rate, red-team"), ("over_refusal", "over-refusal, benign")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.2))
    def err(values, cis):   # the 95% intervals as error bars (0 where there is none)
        return [[max(v - (c or [v, v])[0], 0) for v, c in zip(values, cis)],
                [max((c or [v, v])[1] - v, 0) for v, c in zip(values, cis)]]
    for ax, (key, title) in zip(axes, panels):
        values = [report[n].get(key) or 0.0 for n in names]
        ax.bar(names, values, yerr=err(values, [report[n].get(f"{key}_ci") for n in names]), capsize=4,
               color="#4c72b0")
        ax.set_title(title + " (95%)", fontsize=10)
    values = [elo.get(n, 0.0) for n in names]
    axes[-1].bar(names, values, yerr=err(values, [elo_ci.get(n) for n in names]), capsize=4, color="#dd8452")
    axes[-1].set_title("Elo (feedback model)", fontsize=10)
    axes[-1].set_ylim(min([900.0, *elo.values()]) - 20, max([1100.0, *elo.values()]) + 20)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return spark_job_main(EvaluateConfig, "evaluate", argv, __doc__, run)


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("evaluate"))
