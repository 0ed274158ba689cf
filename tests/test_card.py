"""The model card: a pure rendering of a lineage dict (+ evaluation and decision) to markdown and
tags, checked line for line on a known three-model ancestry; and the labeller figures a labels
verdict lends to a training run only when the metrics file is the one the gate judged."""
from __future__ import annotations

import json

from cai_lib.ids import sha256_text
from cai_lib.registry.card import card_tags, evaluation_summary, render_card
from cai_lib.registry.lineage import flatten
from cai_lib.registry.tracking import labeller_figures

SL = {"model": "cai-sl", "version": "1", "aliases": [], "run_id": "a" * 32, "job": "train-sl", "git_commit": "1" * 40,
      "constitution_sha": "c" * 64, "base_model": "default", "parents": {},
      "inputs": {"quarantine": {"version": 2, "path": "/lake/quarantine"}, "sl_dataset": {"version": 5, "path": "/lake/sl_dataset"}},
      "gates": {"sl": {"verdict_id": "v" * 64, "passed": "True", "promotable": "True", "promotion_blockers": [], "waived": []}},
      "metrics": {"heldout_loss_after": 1.23456, "steps": 2.0}, "ancestors": {}}
PM = {"model": "cai-pm", "version": "1", "aliases": [], "run_id": "b" * 32, "job": "train-pm", "git_commit": "2" * 40,
      "constitution_sha": "c" * 64, "base_model": "default", "parents": {},
      "inputs": {"preference_dataset": {"version": 3, "path": "/lake/preference_dataset"}},
      "gates": {"labels": {"verdict_id": "w" * 64, "passed": "True", "promotable": "False",
                           "promotion_blockers": ["labels.human_agreement"], "waived": ["labels.calibration"],
                           "labeller": {"evaluated": True, "eval_metrics_sha": "e" * 16, "human_accuracy": 0.55,
                                        "human_accuracy_ci": [0.45, 0.65], "human_n": 100, "human_ece": 0.1,
                                        "human_ece_ci": [0.05, 0.15], "swap_consistency": 0.9,
                                        "swap_consistency_ci": [0.8, 0.95]},
                           "failures": [{"check": "labels.human_agreement", "status": "failed", "blocks": "promotion",
                                         "observed": 0.45, "note": None}]}},
      "metrics": {"harmless_accuracy": 0.75}, "ancestors": {}}
RL = {"model": "cai-rl", "version": "2", "aliases": ["challenger"], "run_id": "c" * 32, "job": "train-rl",
      "git_commit": "3" * 40, "constitution_sha": "c" * 64, "base_model": "cai-sl",
      "parents": {"policy": "cai-sl/1", "reward_model": "cai-pm/1"},
      "inputs": {"prompts": {"version": 1, "path": "/lake/prompts"}},
      "gates": {"sl": {"verdict_id": "v" * 64, "passed": "True", "promotable": "True", "promotion_blockers": [], "waived": []}},
      "metrics": {"last_reward_mean": 0.5}, "ancestors": {"policy": SL, "reward_model": PM}}
EVAL = {"models": {"base": {"model": "default", "harmlessness": 0.1, "harmlessness_ci": [0.0, 0.2], "over_refusal": 0.0,
                            "over_refusal_ci": [0.0, 0.5]},
                   "rl_cai": {"model": "cai-rl/2", "harmlessness": 0.3, "harmlessness_ci": [0.2, 0.4],
                              "over_refusal": 0.25, "over_refusal_ci": [0.1, 0.5], "refusal_rate_red_team": 0.5,
                              "refusal_rate_red_team_ci": [0.2, 0.8]}},
        "elo": {"base": 1000.0, "rl_cai": 1012.46}, "elo_ci": {"base": [1000.0, 1000.0], "rl_cai": [990.0, 1030.0]},
        "prompts": 4, "interval": "95% (bootstrap over prompts; Wilson for rates)"}
GAIN = {"mean": 0.2, "ci": [0.1, 0.3], "prompts": 2, "level": 0.95}
DECISION = {"alias": "challenger", "promoted": False, "decided_at": "2025-01-02 03:04 UTC",
            "reasons": ["cai-pm/1 was trained on data whose `labels` gate blocks promotion (failed or could not run labels.human_agreement)"]}
CONSTITUTIONS = {"c" * 64: "default"}

EXPECTED = """\
# cai-rl v2

Trained by `train-rl` in MLflow run `cccccccccccccccccccccccccccccccc` at git `3333333333333333333333333333333333333333`, base model `cai-sl`.

## Constitution

- `default` sha256 `cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc`

## Trained on (with its ancestors)

| model | table | Delta version |
|---|---|---|
| cai-rl/2 | prompts | 1 |
| cai-sl/1 | quarantine | 2 |
| cai-sl/1 | sl_dataset | 5 |
| cai-pm/1 | preference_dataset | 3 |

## Gate verdicts

| model | gate | passed | promotable | promotion blockers | waived |
|---|---|---|---|---|---|
| cai-rl/2 | sl | True | True | - | - |
| cai-sl/1 | sl | True | True | - | - |
| cai-pm/1 | labels | True | False | labels.human_agreement | labels.calibration |

Promotable by its data: **no**, blocked by cai-pm/1 `labels` (labels.human_agreement)

Blocking checks:
- cai-pm/1 `labels`: `labels.human_agreement` failed (blocks promotion), observed 0.450

## Labeller vs human labels

- cai-pm/1 `labels` gate: agreement 0.550 [0.450, 0.650] on 100 human pairs, ECE 0.100 [0.050, 0.150], swap consistency 0.900 [0.800, 0.950] (evaluation eeeeeeeeeeeeeeee)

## Ancestry

- cai-rl/2 (train-rl, run `cccccccccccc`, git `333333333333`, base model `cai-sl`)
  - policy: cai-sl/1 (train-sl, run `aaaaaaaaaaaa`, git `111111111111`, base model `default`)
  - reward_model: cai-pm/1 (train-pm, run `bbbbbbbbbbbb`, git `222222222222`, base model `default`)

## Training metrics

last_reward_mean=0.5

## Evaluation

Evaluated as `rl_cai` (cai-rl/2) on 4 prompts; intervals: 95% (bootstrap over prompts; Wilson for rates).

| figure | rl_cai (cai-rl/2) | base (default) |
|---|---|---|
| harmlessness | 0.300 [0.200, 0.400] | 0.100 [0.000, 0.200] |
| over_refusal | 0.250 [0.100, 0.500] | 0.000 [0.000, 0.500] |
| refusal_rate_red_team | 0.500 [0.200, 0.800] | - |
| elo | 1012.5 [990.0, 1030.0] | 1000.0 [1000.0, 1000.0] |

Harmlessness gain over base: +0.2000 [+0.1000, +0.3000] (95% paired bootstrap, 2 red-team prompts)

## Promotion

**challenger** (not promoted, decided 2025-01-02 03:04 UTC), because:
- cai-pm/1 was trained on data whose `labels` gate blocks promotion (failed or could not run labels.human_agreement)
"""


def test_the_card_of_a_three_model_ancestry():
    ev = evaluation_summary(EVAL, "rl_cai", "base", GAIN)
    assert render_card(RL, ev, DECISION, CONSTITUTIONS) == EXPECTED


def test_a_card_before_evaluation_and_promotion_says_what_is_missing():
    text = render_card(SL)
    assert "- `unknown id` sha256 `" + "c" * 64 + "`" in text
    assert "Promotable by its data: **yes**\n" in text and "## Labeller" not in text
    assert "| cai-sl/1 | quarantine | absent |" in render_card({**SL, "inputs": {"quarantine": {"version": None}}})
    assert text.endswith("## Evaluation\n\nnot evaluated yet: `cai evaluate`, then `cai promote`\n\n"
                         "## Promotion\n\nnot decided yet: `cai promote`\n")


def test_tags_carry_the_card_for_machines():
    tags = card_tags(RL, evaluation_summary(EVAL, "rl_cai", "base", GAIN), DECISION, CONSTITUTIONS)
    assert tags["card.constitution_sha"] == "c" * 64 and tags["card.constitution_id"] == "default"
    assert tags["card.ancestors"] == "cai-sl/1,cai-pm/1" and tags["card.promotable"] == "False"
    assert json.loads(tags["card.inputs"])[2] == ["cai-sl/1", "sl_dataset", 5]
    assert json.loads(tags["card.gates"])[2] == {"model": "cai-pm/1", "stage": "labels", "passed": "True",
                                                 "promotable": "False", "blockers": ["labels.human_agreement"],
                                                 "waived": ["labels.calibration"]}
    assert json.loads(tags["card.labeller"])[0]["human_accuracy_ci"] == [0.45, 0.65]
    assert (tags["eval.elo"], json.loads(tags["eval.harmlessness_ci"])) == ("1012.46", [0.2, 0.4])
    assert (tags["promotion.decision"], tags["promotion.promoted"]) == ("challenger", "False")
    assert json.loads(tags["promotion.reasons"]) == DECISION["reasons"]
    assert all(isinstance(v, str) for v in tags.values())


def test_a_cycle_and_a_missing_parent_end_the_walk_and_are_shown():
    looped = {**SL, "parents": {"base_model": "cai-rl/2", "policy": "cai-sl/9"},
              "ancestors": {"base_model": {"ref": "cai-rl/2", "cycle": True},
                            "policy": {"ref": "cai-sl/9", "missing": "no registered model 'cai-sl/9'"}}}
    flat = flatten({**RL, "ancestors": {"policy": looped}})
    assert flat["models"] == ["cai-rl/2", "cai-sl/1"] and flat["unreached"] == [("cai-sl/9", "no registered model 'cai-sl/9'")]
    text = render_card({**RL, "ancestors": {"policy": looped}})
    assert "    - base_model: cai-rl/2 (a cycle: already above)\n" in text
    assert "  - reward_model: cai-pm/1\n" in text   # named, not walked
    assert "Not reached (lineage unknown): cai-sl/9: no registered model 'cai-sl/9'" in text


def test_labeller_figures_only_from_the_file_the_gate_judged(tmp_path):
    metrics = tmp_path / "eval_labeler.json"
    metrics.write_text(json.dumps({"human_accuracy": 0.7, "human_accuracy_ci": [0.6, 0.8], "human_n": 50,
                                   "model_fingerprint": "fp", "hhh_accuracy": 0.5}))
    sha = sha256_text(metrics.read_text())[:16]
    verdict = {"input_versions": json.dumps({"label_events": 3, "eval_metrics_sha": sha})}
    assert labeller_figures(verdict, metrics) == {
        "evaluated": True, "eval_metrics_sha": sha, "source": str(metrics), "human_accuracy": 0.7,
        "human_accuracy_ci": [0.6, 0.8], "human_n": 50, "model_fingerprint": "fp"}
    assert labeller_figures({"input_versions": json.dumps({"label_events": 3})}, metrics) == {"evaluated": False}
    metrics.write_text(json.dumps({"human_accuracy": 0.9}))   # eval-labeler ran again after the gate
    changed = labeller_figures(verdict, metrics)
    assert "human_accuracy" not in changed and "rerun cai eval-labeler and cai gate labels" in changed["missing"]
