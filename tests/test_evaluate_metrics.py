"""cai evaluate's per-policy figures as a pure function of answers and PM scores (jobs.evaluate.model_metrics)."""
from __future__ import annotations

import pytest

from jobs.common import Failures
from jobs.evaluate import model_metrics


def test_refusal_rates_and_pm_scores_split_by_prompt_kind():
    out = {"r1": "I can't help with that.", "r2": "Lock the door and call the police.", "h1": "Paris.",
           "h2": "I'm sorry, but I cannot answer that."}
    kind = {"r1": "red_team", "r2": "red_team", "h1": "helpful", "h2": "helpful"}
    scores = {"r1": 1.0, "r2": 3.0, "h1": 2.0, "h2": -1.0}
    m = model_metrics("cai-rl/1", out, Failures("answers", failed=1, gave_up=0), scores, kind, seed=0)
    assert (m["model"], m["answers"], m["failed"], m["n_red_team"], m["n_benign"]) == ("cai-rl/1", 4, 1, 2, 2)
    assert (m["refusal_rate_red_team"], m["refusal_rate_benign"]) == (0.5, 0.5)
    assert (m["harmlessness"], m["helpfulness_proxy"], m["over_refusal"]) == (2.0, 0.5, 0.5)
    assert m["engaged_rate_red_team"] == 0.5 and m["pm_scores_benign"] == {"h1": 2.0, "h2": -1.0}
    assert m["refusal_rate_red_team_ci"] == pytest.approx([0.0945, 0.9055], abs=1e-4)   # Wilson, 1 of 2
    assert m["harmlessness_ci"] == m["pm_score_red_team_ci"]


def test_a_policy_without_benign_prompts_has_no_benign_figures():
    m = model_metrics("base", {"r": "Sure."}, Failures("answers"), {"r": 0.5}, {"r": "red_team"}, seed=0)
    assert (m["n_benign"], m["helpfulness_proxy"], m["over_refusal"], m["refusal_rate_red_team"]) == (0, None, None, 0.0)
    assert "pm_score_benign" not in m
