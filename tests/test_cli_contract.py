"""The CLI tells the truth: every command is listed, a flag a command would ignore is an error,
models are chosen by one scheme of flags, params.yaml is typed like the flags, the fake backend
never borrows a real model's name, and every job's defaults come from one place."""
from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from cai_lib.config import COMMON_KEYS, LakeConfig, build_parser, load_config, settings_from
from jobs.cli import COMMANDS
from jobs.cli import main as cai

ROOT = Path(__file__).resolve().parents[1]
JOB_COMMANDS = [c for c, (t, _) in COMMANDS.items() if t.endswith(":main")]
MODEL_FLAGS = {"--base-model", "--policy", "--policies", "--feedback-model", "--reward-model"}


def config_class(cmd: str):
    module = importlib.import_module(COMMANDS[cmd][0].split(":")[0])
    [cls] = [o for o in vars(module).values() if isinstance(o, type) and dataclasses.is_dataclass(o)
             and issubclass(o, LakeConfig) and o.__module__ == module.__name__]
    return cls


def flags_of(cmd: str) -> set[str]:
    parser = build_parser(config_class(cmd), f"cai {cmd}", "")
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def test_help_lists_every_command_with_its_purpose(capsys):
    assert cai(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd, (_, what) in COMMANDS.items():
        assert f"  {cmd}" in out and what in out, cmd
    assert len(COMMANDS) == 19


@pytest.mark.parametrize("cmd,flag", [("train-pm", "--backend"), ("train-sl", "--spark-master"),
                                      ("ingest", "--dtype"), ("gate", "--backend"), ("promote", "--model"),
                                      ("train-rl", "--model"), ("eval-labeler", "--limit"),
                                      ("eval-labeler", "--splits"), ("eval-labeler", "--pointer"),
                                      ("evaluate", "--pointer"), ("train-pm", "--pointer"),
                                      ("train-pm", "--threads")])
def test_a_flag_the_command_would_ignore_is_an_error(cmd, flag, capsys):
    args = ["sl"] if cmd == "gate" else []
    with pytest.raises(SystemExit) as exc:
        cai([cmd, *args, flag, "1"])
    assert exc.value.code == 2
    assert f"{flag}: not used by `cai {cmd}` (it would be ignored)" in capsys.readouterr().err


def test_one_naming_scheme_for_models():
    chosen = {cmd: flags_of(cmd) & MODEL_FLAGS for cmd in JOB_COMMANDS}
    assert chosen == {
        "ingest": set(), "gate": set(), "sl-generate": {"--base-model"}, "train-sl": {"--base-model"},
        "sample-pairs": {"--policy"}, "label": {"--policy", "--feedback-model"},
        "eval-labeler": {"--feedback-model"}, "train-pm": {"--base-model"},
        "train-rl": {"--policy", "--reward-model"}, "evaluate": {"--policies", "--feedback-model", "--reward-model"},
        "promote": {"--policy"}}
    for cmd in JOB_COMMANDS:   # no other flag picks a model
        assert not {f for f in flags_of(cmd) if f in ("--model", "--models", "--candidate", "--policy-model")}, cmd


def test_every_command_that_reads_params_takes_params():
    for cmd in JOB_COMMANDS:
        assert "--params" in flags_of(cmd), cmd
    for tool in ("sql", "status", "lineage", "lake check"):
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *tool.split(), "--help"], capture_output=True, text=True,
                              cwd=ROOT)
        assert "--params" in proc.stdout, tool


def test_params_values_are_typed_like_flags(tmp_path):
    from jobs.sl_generate import SLGenerateConfig
    p = tmp_path / "p.yaml"
    p.write_text("sl_generate:\n  rounds: '4'\n")
    with pytest.raises(ValueError, match=r"p.yaml \[sl_generate\] rounds: '4' is a str, expected int. Fix: write "
                                         r"the number without quotes"):
        load_config(SLGenerateConfig, "sl_generate", ["--params", str(p)])
    p.write_text("common:\n  torch_threads: two\n")   # [common] is checked even for jobs without the key
    from jobs.ingest import IngestConfig
    with pytest.raises(ValueError, match=r"\[common\] torch_threads: 'two' is a str, expected int"):
        load_config(IngestConfig, "ingest", ["--params", str(p)])
    p.write_text("sl_generate:\n  splits: train\n")
    with pytest.raises(ValueError, match=r"\[sl_generate\] splits: 'train' is a str, expected list"):
        load_config(SLGenerateConfig, "sl_generate", ["--params", str(p)])
    p.write_text("common:\n  model: default\n")
    with pytest.raises(ValueError, match=r"\[common\]: unknown key\(s\) \['model'\]"):
        load_config(SLGenerateConfig, "sl_generate", ["--params", str(p)])
    p.write_text("sl_generate:\n  temperature: 1\n  rounds: 3\n")   # an int where a float goes is widened
    cfg = load_config(SLGenerateConfig, "sl_generate", ["--params", str(p)])
    assert cfg.temperature == 1.0 and isinstance(cfg.temperature, float) and cfg.rounds == 3


def test_common_keys_reach_only_the_jobs_that_have_them(tmp_path):
    from jobs.eval_labeler import EvalLabelerConfig
    from jobs.train_sl import TrainSLConfig
    p = tmp_path / "p.yaml"
    p.write_text("common:\n  base_model: my/base\n  feedback_model: my/judge\n  dtype: float16\n  torch_threads: 1\n")
    sl = load_config(TrainSLConfig, "train_sl", ["--params", str(p)])
    assert (sl.base_model, sl.torch_threads, sl.train_dtype) == ("my/base", 1, "float32")  # [common] dtype is the backend's
    ev = load_config(EvalLabelerConfig, "eval_labeler", ["--params", str(p)])
    assert (ev.feedback_model, ev.dtype) == ("my/judge", "float16") and not hasattr(ev, "base_model")
    assert {"base_model", "feedback_model", "lake", "seed", "torch_threads"} <= COMMON_KEYS


def test_the_fake_backend_refuses_real_and_registered_model_names(capsys):
    assert cai(["sl-generate", "--backend", "fake", "--base-model", "cai-sl", "--lake", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert "the fake backend writes deterministic test text" in err and "'cai-sl'" in err
    from jobs.sample_pairs import SamplePairsConfig
    with pytest.raises(ValueError, match="refuses the model 'default'"):
        SamplePairsConfig(backend="fake", policy="default")
    assert SamplePairsConfig(backend="fake", policy="fake").policy == "fake"
    from jobs.evaluate import EvaluateConfig
    with pytest.raises(ValueError, match="refuses the model 'cai-rl'"):
        EvaluateConfig(backend="fake", feedback_model="fake", policies=["base=fake", "rl=cai-rl"])


def test_training_defaults_have_one_source():
    from cai_lib.training.pm_train import PMSettings
    from cai_lib.training.policy import RLSettings
    from cai_lib.training.sft import SFTSettings
    from jobs.train_pm import TrainPMConfig
    from jobs.train_rl import TrainRLConfig
    from jobs.train_sl import TrainSLConfig
    for job, settings in ((TrainSLConfig, SFTSettings), (TrainPMConfig, PMSettings), (TrainRLConfig, RLSettings)):
        cfg = job()
        assert dataclasses.asdict(cfg.settings()) == dataclasses.asdict(settings()), job.__name__
    cfg = load_config(TrainRLConfig, "train_rl", ["--params", "/dev/null", "--steps", "3", "--kl-mode",
                                                  "adaptive", "--torch-threads", "1"])
    s = cfg.settings()
    assert (s.steps, s.kl_mode, s.torch_threads, s.ppo_epochs) == (3, "adaptive", 1, RLSettings().ppo_epochs)
    assert settings_from(cfg, RLSettings, steps=5).steps == 5


def test_every_model_running_job_takes_one_device_flag(tmp_path):
    """SFT, PM, PPO/DPO and evaluate's PM: one `--device`, copied into the library settings."""
    from jobs.train_pm import TrainPMConfig
    from jobs.train_rl import TrainRLConfig
    from jobs.train_sl import TrainSLConfig
    assert {"train-sl", "train-pm", "train-rl", "evaluate"} <= {c for c in JOB_COMMANDS if "--device" in flags_of(c)}
    for job, section in ((TrainSLConfig, "train_sl"), (TrainPMConfig, "train_pm"), (TrainRLConfig, "train_rl")):
        cfg = load_config(job, section, ["--params", "/dev/null", "--device", "cpu"])
        assert (cfg.device, cfg.settings().device, job().settings().device) == ("cpu", "cpu", None), job.__name__
    with pytest.raises(ValueError, match=r"train_rl config \(read from /dev/null \[common\] \+ \[train_rl\], then the "
                                         r"flags\): RLSettings.device 'gpu' is not a device this project "
                                         r"runs on. Fix: pass cpu, cuda, cuda:N or auto"):
        load_config(TrainRLConfig, "train_rl", ["--params", "/dev/null", "--device", "gpu"])


def test_job_files_refuse_to_run_as_scripts():
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/promote.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert "spark-submit launch/cai_task.py promote" in proc.stderr


def test_tools_take_the_lake_and_metrics_files_from_params(small_lake, tmp_path, capsys):
    import json
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "labeller.json").write_text(json.dumps({"human_n": 7, "human_accuracy": 0.625}))
    p = tmp_path / "p.yaml"
    p.write_text(f"common:\n  lake: {small_lake}\n  tracking_uri: sqlite:///{tmp_path}/none.db\n"
                 f"eval_labeler:\n  metrics: {tmp_path}/m/labeller.json\n")
    assert cai(["sql", "--params", str(p), "--format", "csv", "SELECT count(*) AS n FROM prompts"]) == 0
    assert capsys.readouterr().out.split() == ["n", "5"]
    assert cai(["status", "--params", str(p)]) == 0
    out = capsys.readouterr().out
    assert f"lake {small_lake}" in out and "eval_labeler  human_n=7, human_accuracy=0.625" in out


@pytest.mark.parametrize("argv,rc", [(["--help"], 0), (["lineage"], 2), (["lineage", "--depth", "x", "m"], 2)])
def test_the_cai_program_runs_python_exit_clean_up_and_keeps_the_exit_code(argv, rc, tmp_path):
    """`cai` ends with os._exit (no native static destructors: see jobs.cli.console), after atexit's work
    and with the code main() or argparse gave."""
    code = ("import atexit, sys; atexit.register(lambda: print('clean-up ran', flush=True)); "
            f"sys.argv = ['cai', *{argv!r}]; from jobs.cli import console; console()")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.splitlines()[-1]) == (rc, "clean-up ran"), done.stderr[-2000:]
