"""The CLI tells the truth: a flag these settings would ignore is an error that says why, and `cai status`
shows a metric that was not measured as missing, not as 0. Pure: no Spark, no model."""
from __future__ import annotations

import json

import pytest

from cai_lib.config import ConfigError, load_config
from jobs import cli
from jobs.gate import GateConfig
from jobs.label import LabelConfig
from jobs.tools import _print_metrics
from jobs.train_sl import TrainSLConfig

IGNORED = [
    (["label", "--clamp-lo", "0.3"], "flag --clamp-lo counts only when cot is True, and here cot is False: it would "
                                      "be ignored. Fix: drop --clamp-lo, or pass --cot"),
    (["label", "--temperature", "0.2"], "flag --temperature counts only when cot is True"),
    (["label", "--top-p", "0.5"], "flag --top-p counts only when cot is True"),
    (["label", "--max-attempts", "3"], "flag --max-attempts counts only when cot is True"),
    (["gate", "prompts", "--max-ece", "0.01"], "flag --max-ece counts only when stage is labels, and here stage is "
                                               "prompts: it would be ignored. Fix: drop --max-ece, or pass --stage labels"),
    (["gate", "labels", "--max-empty-rate", "0.1"], "flag --max-empty-rate counts only when stage is sl, and here "
                                                    "stage is labels"),
    (["gate", "labels", "--max-prompt-chars", "10"], "flag --max-prompt-chars counts only when stage is prompts or sl"),
    (["sql", "SELECT 1", "--spark-master", "local[2]"], "--spark-master counts only with --engine spark: DuckDB "
                                                        "would ignore it. Fix: drop --spark-master, or pass --engine spark"),
    (["train-sl", "--lora-r", "8"], "flag --lora-r counts only when method is lora, and here method is full: it would "
                                    "be ignored. Fix: drop --lora-r, or pass --method lora"),
]


@pytest.mark.parametrize("argv, message", IGNORED)
def test_a_flag_the_settings_would_ignore_is_an_error(argv, message, capsys, tmp_path):
    assert cli.main([*argv, "--lake", str(tmp_path / "lake"), "--params", "/dev/null"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cai {argv[0]}: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "lake").exists()


@pytest.mark.parametrize("cls, section, argv, want", [
    (LabelConfig, "label", ["--cot", "--clamp-lo", "0.3", "--temperature", "0.2", "--max-attempts", "3"],
     {"cot": True, "clamp_lo": 0.3, "temperature": 0.2, "max_attempts": 3}),
    (GateConfig, "gate", ["--stage", "labels", "--max-ece", "0.01", "--clamp-lo", "0.3"],
     {"stage": "labels", "max_ece": 0.01, "clamp_lo": 0.3}),
    (GateConfig, "gate", ["--stage", "sl", "--max-prompt-chars", "10", "--max-empty-rate", "0.1"],
     {"stage": "sl", "max_prompt_chars": 10, "max_empty_rate": 0.1}),
    (TrainSLConfig, "train_sl", ["--method", "lora", "--lora-r", "8"], {"method": "lora", "lora_r": 8}),
])
def test_the_same_flags_count_where_they_are_used(cls, section, argv, want):
    cfg = load_config(cls, section, [*argv, "--params", "/dev/null"])
    assert {k: getattr(cfg, k) for k in want} == want


def test_a_params_file_may_set_them_for_every_run(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("label:\n  clamp_lo: 0.3\n  temperature: 0.2\n")
    cfg = load_config(LabelConfig, "label", ["--params", str(params)])
    assert (cfg.cot, cfg.clamp_lo, cfg.temperature) == (False, 0.3, 0.2)
    with pytest.raises(ConfigError, match="flag --top-p counts only when cot is True"):
        load_config(LabelConfig, "label", ["--params", str(params), "--top-p", "0.5"])


def test_status_shows_a_metric_not_measured_as_missing(tmp_path, capsys):
    evaluation = tmp_path / "evaluate.json"
    evaluation.write_text(json.dumps({"models": {"rl": {"model": "cai-rl/1", "harmlessness": None,
                                                         "over_refusal": 0.25}}, "elo": {}}))
    _print_metrics({"evaluate": {"metrics": str(evaluation)}, "eval_labeler": {"metrics": str(tmp_path / "no.json")},
                    "promote": {"decision": str(tmp_path / "no.json")}})
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == ("  evaluate      rl (cai-rl/1): harmlessness=missing over_refusal=0.25 "
                       "refusal_red_team=missing elo=missing")
