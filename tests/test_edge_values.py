"""Every value is checked at the edge, before a job starts Spark: params-file values and flags alike
(finite floats, bounds, choices, non-empty paths), errors naming where the value came from; a named
params file must exist; every --help renders; constitutions refuse the characters ingest quarantines;
a cloud lake URI is never folded into a local path; ingest counts the duplicates it drops.

    python -m pytest -q tests/test_edge_values.py      # pure and in-process: no Spark, no model
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import shutil

import pytest
import yaml

from cai_lib.config import LakeConfig, SparkModelConfig, load_config
from jobs.cli import COMMANDS
from jobs.cli import main as cai
from jobs.sl_generate import SLGenerateConfig
from tests.conftest import ROOT, write_jsonl

JOBS = {c: t.split(":")[0] for c, (t, _) in COMMANDS.items() if t.endswith(":main")}


def job_config(cmd: str):
    module = importlib.import_module(JOBS[cmd])
    [cls] = [o for o in vars(module).values() if isinstance(o, type) and dataclasses.is_dataclass(o)
             and issubclass(o, LakeConfig) and o.__module__ == module.__name__]
    return cls


def about(cls, key: str) -> str:
    """The `(key: help)` an error quotes, so a message can be compared whole."""
    return f"({key}: {next(f for f in dataclasses.fields(cls) if f.name == key).metadata['help']})"


def refusal(cls, section: str, argv: list[str]) -> str:
    with pytest.raises(ValueError) as exc:
        load_config(cls, section, argv)
    return str(exc.value)


# ---------------------------------------------------------------- --help

def test_every_command_and_subcommand_prints_its_help(capsys):
    """argparse %-formats help texts: an unescaped "95%" made `cai gate --help` a TypeError."""
    subcommands = []
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            cai([cmd, "--help"])
        assert exc.value.code == 0, cmd
        usage = capsys.readouterr().out.split("\n\n")[0]
        assert usage.startswith(f"usage: cai {cmd}"), usage
        found = re.search(r"\{([a-z,-]+)\} \.\.\.", usage)   # subcommands, not a flag's choices
        for sub in found.group(1).split(",") if found else ():
            with pytest.raises(SystemExit) as exc:
                cai([cmd, sub, "--help"])
            assert exc.value.code == 0, (cmd, sub)
            assert capsys.readouterr().out.startswith(f"usage: cai {cmd} {sub}")
            subcommands.append(f"{cmd} {sub}")
    assert {"lake check", "lake restore", "constitution validate", "constitution import", "model prepare"} \
        <= set(subcommands)


# ---------------------------------------------------------------- params and flags

def test_bad_params_values_are_refused_by_load_config_naming_file_section_key_value(tmp_path):
    p = tmp_path / "params.yaml"
    cases = [("common:\n  backend: sparky\n",
              f"{p} [common] backend: 'sparky' is not one of 'transformers', 'vllm', 'fake' "
              f"{about(SparkModelConfig, 'backend')}. Fix: write one of them"),
             ("common:\n  lake_engine: spark\n",   # a key an older release read: what changed, and the fix
              f"{p} [common] lake_engine: delta-spark is now the lake's only writer (every job runs on the Spark "
              "plane; delta-rs and DuckDB only read): remove the key"),
             ("sl_generate:\n  rounds: -1\n",
              f"{p} [sl_generate] rounds: -1 is below the minimum 1 {about(SLGenerateConfig, 'rounds')}. "
              "Fix: give a value from 1 to 16"),
             ("sl_generate:\n  top_p: 5\n",
              f"{p} [sl_generate] top_p: 5.0 is above the maximum 1.0 {about(SLGenerateConfig, 'top_p')}. "
              "Fix: give a value > 0.0 and <= 1.0"),
             ("sl_generate:\n  temperature: .nan\n",
              f"{p} [sl_generate] temperature: nan is not a finite number {about(SLGenerateConfig, 'temperature')}. "
              "Fix: give a number from 0.0 to 10.0"),
             ("sl_generate:\n  splits: [train, validation]\n",
              f"{p} [sl_generate] splits: 'validation' is not one of 'train', 'test' "
              f"{about(SLGenerateConfig, 'splits')}. Fix: write one of them")]
    for text, message in cases:
        p.write_text(text)
        assert refusal(SLGenerateConfig, "sl_generate", ["--params", str(p)]) == message


def test_bad_flag_values_are_refused_naming_the_flag():
    base = ["--params", "/dev/null"]
    temperature = about(SLGenerateConfig, "temperature")
    for value in ("nan", "inf", "-inf"):
        assert refusal(SLGenerateConfig, "sl_generate", [*base, f"--temperature={value}"]) == \
            f"flag --temperature: {float(value)} is not a finite number {temperature}. Fix: give a number from 0.0 to 10.0"
    assert refusal(SLGenerateConfig, "sl_generate", [*base, "--rounds", "1000000", "--limit", "1"]) == \
        f"flag --rounds: 1000000 is above the maximum 16 {about(SLGenerateConfig, 'rounds')}. Fix: give a value from 1 to 16"
    assert refusal(SLGenerateConfig, "sl_generate", [*base, "--lake", ""]) == \
        f"flag --lake: '' is empty {about(LakeConfig, 'lake')}. Fix: give lake a value"
    assert refusal(SLGenerateConfig, "sl_generate", [*base, "--backend", "tpu"]).startswith(
        "flag --backend: 'tpu' is not one of 'transformers', 'vllm', 'fake' (backend: ")


def test_a_refusal_while_building_the_config_names_the_params_file():
    from jobs.train_rl import TrainRLConfig
    assert refusal(TrainRLConfig, "train_rl", ["--params", "/dev/null", "--batch-size", "4",
                                               "--mini-batch-size", "8"]) == \
        "train_rl config (read from /dev/null [common] + [train_rl], then the flags): " \
        "RLSettings.mini_batch_size must be <= batch_size (4), got 8"


def test_a_config_built_in_code_is_checked_like_params():
    with pytest.raises(ValueError) as exc:
        SLGenerateConfig(backend="fake", base_model="fake", rounds=0)
    assert str(exc.value) == f"SLGenerateConfig rounds: 0 is below the minimum 1 {about(SLGenerateConfig, 'rounds')}. " \
                             "Fix: give a value from 1 to 16"


def test_the_gate_checks_the_label_clamps_it_borrows(tmp_path):
    from jobs.gate import GateConfig
    p = tmp_path / "params.yaml"
    p.write_text("label:\n  clamp_lo: 0.7\n")
    assert refusal(GateConfig, "gate", ["--params", str(p), "--stage", "labels"]) == \
        f"gate config (read from {p} [common] + [gate], then the flags): {p} [label] clamp_lo: 0.7 is not below " \
        f"0.5 {about(GateConfig, 'clamp_lo')}. Fix: give a value >= 0.0 and < 0.5"


def test_defaults_and_the_project_params_are_inside_every_bound():
    """A bound that refuses params.yaml (what dvc repro runs) or a default is a wrong bound."""
    from cai_lib.config import check_bounds
    for cmd in JOBS:
        cls = job_config(cmd)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            check_bounds(f, default, f"{cls.__name__} {f.name}")
        argv = ["--params", str(ROOT / "params.yaml")] + (["--stage", "labels"] if cmd == "gate" else [])
        assert load_config(cls, cmd.replace("-", "_"), argv).lake == "lake", cmd


# ---------------------------------------------------------------- the params file itself

def test_a_named_params_file_must_exist_only_the_implicit_one_may_be_absent(tmp_path, monkeypatch):
    missing = tmp_path / "parms.yaml"
    fix = "Fix: check --params (or $CAI_PARAMS), or pass --params /dev/null to run on the defaults alone"
    assert refusal(SLGenerateConfig, "sl_generate", ["--params", str(missing)]) == \
        f"params file {missing} does not exist. {fix}"
    monkeypatch.setenv("CAI_PARAMS", str(missing))
    assert refusal(SLGenerateConfig, "sl_generate", []) == f"params file {missing} does not exist. {fix}"
    assert refusal(SLGenerateConfig, "sl_generate", ["--params", ""]).startswith("flag --params: '' is empty")
    monkeypatch.delenv("CAI_PARAMS")
    monkeypatch.chdir(tmp_path)   # no ./params.yaml, no flag, no $CAI_PARAMS: the defaults (a quick try)
    shutil.copytree(ROOT / "constitutions", tmp_path / "constitutions")   # the default one is loaded with the config
    cfg = load_config(SLGenerateConfig, "sl_generate", [])
    assert (cfg.params, cfg.rounds) == ("params.yaml", 4)
    assert refusal(SLGenerateConfig, "sl_generate", ["--params", "params.yaml"]) == \
        f"params file params.yaml does not exist. {fix}"


# ---------------------------------------------------------------- lake, constitution, ingest

@pytest.mark.parametrize("uri", ["s3://b/x", "dbfs:/b/x"])   # Databricks' dbfs:/ has one slash
def test_a_lake_uri_is_kept_intact_and_never_made_a_local_folder(tmp_path, monkeypatch, capsys, uri):
    from cai_lib.lake.spark_delta import SparkDeltaLake
    from cai_lib.lake.tables import Lake, LakeTargetError, check_lake_target
    monkeypatch.chdir(tmp_path)
    message = (f"lake {uri} is a URI, but delta-rs here opens local folders only (cai status, cai sql, notebooks). "
               "Fix: query it on the cluster with `cai sql --engine spark`, or point --lake at a local folder")
    with pytest.raises(LakeTargetError) as exc:
        Lake(uri)
    assert str(exc.value) == message
    assert cai(["status", "--lake", uri]) == 1
    assert capsys.readouterr().err == f"cai status: error: {message}\n"
    check_lake_target(uri, "write")   # the cluster's to check: not "no lake at" a local folder of that name
    assert SparkDeltaLake(None, uri + "/").root == uri   # not glued under the working folder by resolve()
    assert list(tmp_path.iterdir()) == []   # no folder "s3:" or "dbfs:" beside it


def test_constitution_texts_refuse_hidden_characters(tmp_path):
    from cai_lib.constitution.load import load_constitution
    from cai_lib.constitution.model import ConstitutionError
    doc = yaml.safe_load((ROOT / "constitutions/default.yaml").read_text())
    pid = doc["critique_revision"][0]["id"]
    doc["critique_revision"][0]["critique"] = "Identify harm\u202e in the answer."
    bidi = tmp_path / "bidi.yaml"
    bidi.write_text(yaml.safe_dump(doc, allow_unicode=True))
    with pytest.raises(ConstitutionError) as exc:
        load_constitution(bidi)
    assert str(exc.value) == (
        f"{bidi}: critique_revision[0] (id '{pid}'): field 'critique' holds RIGHT-TO-LEFT OVERRIDE (U+202E) at "
        "character 14, which hides or reorders what a reader sees (prompts holding one are quarantined at ingest). "
        "Fix: remove it from the file")
    assert cai(["constitution", "validate", str(bidi)]) == 1
    doc = yaml.safe_load((ROOT / "constitutions/default.yaml").read_text())
    cid = doc["comparison"][1]["id"]
    doc["comparison"][1]["text"] = "Which is less harmful?\x00"
    nul = tmp_path / "nul.yaml"
    nul.write_text(yaml.safe_dump(doc))   # YAML writes the NUL as the escape "\0"
    with pytest.raises(ConstitutionError, match=re.escape(
            f"{nul}: comparison[1] (id '{cid}'): field 'text' holds a control character (U+0000) at character 23")):
        load_constitution(nul)


def test_ingest_counts_the_duplicates_it_drops(tmp_path):
    from jobs.ingest import IngestConfig, run
    same = {"prompt": "How do I pick a lock?"}
    src = write_jsonl(tmp_path / "same.jsonl", [same] * 5 + [{"prompt": "How do I bake bread?"}])
    cfg = IngestConfig(lake=str(tmp_path / "lake"), params="/dev/null", source=str(src), kind="red_team")
    summary = run(None, cfg)
    assert {k: summary[k] for k in ("read", "duplicates", "inserted", "already_present", "quarantined")} == \
        {"read": 6, "duplicates": 4, "inserted": 2, "already_present": 0, "quarantined": 0}
    again = run(None, cfg)
    assert (again["read"], again["duplicates"], again["inserted"], again["already_present"]) == (6, 4, 0, 2)
