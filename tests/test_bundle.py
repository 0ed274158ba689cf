"""The Databricks bundle (databricks.yml + resources/*.yml) runs dvc.yaml's pipeline, checked offline.

Nothing here reaches a workspace (`databricks bundle validate` needs one): the checks are on the
YAML. The job's tasks are dvc.yaml's stages with the same dependency order, every task runs a
`cai` job with flags that job accepts, generation runs on GPUs with vLLM, every variable used is
declared, and the task launcher turns a job's exit status into the task's.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai_lib.config import LakeConfig, build_parser
from jobs.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
GENERATION = {"sl_generate", "sample_pairs", "label", "eval_labeler", "evaluate"}  # model calls on Spark executors
TRAINING = {"train_sl", "train_pm", "train_rl"}
CPU_ONLY = {"ingest", "gate_sl", "gate_labels", "promote"}
VAR = re.compile(r"\$\{var\.([A-Za-z0-9_]+)\}")


def load_bundle() -> dict:
    """databricks.yml with the resources of its `include` globs merged in (as the CLI does)."""
    bundle = yaml.safe_load((ROOT / "databricks.yml").read_text())
    for pattern in bundle.get("include", []):
        for path in sorted(ROOT.glob(pattern)):
            for kind, items in (yaml.safe_load(path.read_text()).get("resources") or {}).items():
                bundle.setdefault("resources", {}).setdefault(kind, {}).update(items)
    return bundle


@pytest.fixture(scope="module")
def bundle():
    return load_bundle()


@pytest.fixture(scope="module")
def job(bundle):
    return bundle["resources"]["jobs"]["cai_pipeline"]


@pytest.fixture(scope="module")
def tasks(job):
    return {t["task_key"]: t for t in job["tasks"]}


def runnable(task: dict) -> dict:
    """The task that runs the command (a for_each task runs its inner task once per input)."""
    return task["for_each_task"]["task"] if "for_each_task" in task else task


def argv(task: dict) -> list[str]:
    return [str(a) for a in runnable(task)["spark_python_task"]["parameters"]]


def resolve(value: str, variables: dict) -> str:
    """Substitute ${var.X} with the declared defaults (recursively), ${workspace.file_path} with the checkout."""
    for _ in range(10):
        value = VAR.sub(lambda m: str(variables[m.group(1)]["default"]), value)
    return value.replace("${workspace.file_path}", str(ROOT))


def cluster(job: dict, task: dict) -> dict:
    key = runnable(task)["job_cluster_key"]
    return next(c["new_cluster"] for c in job["job_clusters"] if c["job_cluster_key"] == key)


# dvc.yaml stages with no bundle task, and why
DVC_ONLY = {"reviews": "it only tells DVC that review_events changed (DVC cannot see into the lake); a job run "
                       "runs every task, so label, eval_labeler and gate_labels read the verdicts there anyway"}


def dvc_stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {s: d for s, d in stages.items() if s not in DVC_ONLY}


def dvc_upstream() -> dict[str, set[str]]:
    """{stage: stages it depends on directly}: a dep that is (or lies under) another stage's out, metric or plot."""
    stages = dvc_stages()

    def paths(entries):
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    produced = {s: paths(d.get("outs")) + paths(d.get("metrics")) + paths(d.get("plots")) for s, d in stages.items()}
    return {s: {o for o, outs in produced.items() if o != s and any(
                dep == out or out.startswith(dep.rstrip("/") + "/") for dep in paths(d.get("deps")) for out in outs)}
            for s, d in stages.items()}


def ancestors(graph: dict[str, set[str]], node: str) -> set[str]:
    seen, todo = set(), list(graph[node])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(graph[n])
    return seen


def bundle_upstream(tasks: dict) -> dict[str, set[str]]:
    return {k: {d["task_key"] for d in t.get("depends_on", [])} for k, t in tasks.items()}


def test_targets_dev_is_default_and_prod_exists(bundle):
    assert bundle["bundle"]["name"] == "cai-lake"
    assert bundle["targets"]["dev"].get("default") is True and bundle["targets"]["dev"]["mode"] == "development"
    assert bundle["targets"]["prod"]["mode"] == "production"


def test_task_keys_are_unique_and_dependencies_exist(job, tasks):
    keys = [t["task_key"] for t in job["tasks"]]
    inner = [t["for_each_task"]["task"]["task_key"] for t in job["tasks"] if "for_each_task" in t]
    assert len(set(keys + inner)) == len(keys + inner), f"duplicate task_key in {keys + inner}"
    for key, ups in bundle_upstream(tasks).items():
        assert ups <= set(tasks), f"{key} depends on unknown task(s) {sorted(ups - set(tasks))}"


def test_task_graph_is_acyclic(tasks):
    graph, done = bundle_upstream(tasks), set()
    while len(done) < len(graph):
        ready = {k for k, ups in graph.items() if k not in done and ups <= done}
        assert ready, f"cycle among {sorted(set(graph) - done)}"
        done |= ready


def test_one_task_per_dvc_stage(tasks):
    stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert set(DVC_ONLY) <= stages
    assert set(tasks) == (stages - set(DVC_ONLY)) | {"evaluate", "promote"}


def test_task_order_is_dvc_order(tasks):
    """Every stage a DVC stage depends on (through pointer/model/metrics files) runs before its task, and no more."""
    dvc, ours = dvc_upstream(), bundle_upstream(tasks)
    for stage in dvc:
        assert ancestors(ours, stage) == ancestors(dvc, stage), (
            f"{stage}: bundle runs after {sorted(ancestors(ours, stage))}, dvc.yaml after {sorted(ancestors(dvc, stage))}")
    for extra in set(tasks) - set(dvc):  # evaluate/promote before dvc.yaml has them
        assert "train_rl" in ancestors(ours, extra)


def test_every_task_runs_a_cai_job_with_flags_it_accepts(tasks):
    for key, task in tasks.items():
        run = runnable(task)
        assert set(run) & {"spark_python_task", "python_wheel_task"} == {"spark_python_task"}, key
        assert (ROOT / "resources" / run["spark_python_task"]["python_file"]).resolve() == ROOT / "launch/cai_task.py"
        cmd, *flags = argv(task)
        assert cmd in COMMANDS, f"{key}: `cai {cmd}` is not a command (jobs.cli.COMMANDS)"
        assert key.startswith(cmd.replace("-", "_")), f"{key} runs `cai {cmd}`"
        if cmd == "gate":  # `cai gate STAGE ...`: the stage is positional
            assert flags[0] == key.removeprefix("gate_"), key
            flags = ["--stage", *flags]
        module = importlib.import_module(COMMANDS[cmd][0].split(":")[0])
        [cls] = [o for o in vars(module).values() if isinstance(o, type) and dataclasses.is_dataclass(o)
                 and issubclass(o, LakeConfig) and o.__module__ == module.__name__]
        parser = build_parser(cls, f"cai {cmd}", "")
        accepted = {s for action in parser._actions for s in action.option_strings}
        unknown = [f for f in flags if f.startswith("--") and f not in accepted]  # exact: no abbreviations
        assert not unknown, f"{key}: `cai {cmd}` has no flag(s) {unknown}"
        numbers = ("{{input.limit}}", "{{input.seed}}", "${var.gpu_workers}")   # what feeds int flags
        parser.parse_args([re.sub(r"\$\{[^}]+\}|\{\{[^}]+\}\}", lambda m: "0" if m.group(0) in numbers else "X", f)
                           for f in flags])  # values fit
        assert "--lake" in flags and "--params" in flags, f"{key}: every task names the lake and params.yaml"


def test_generation_runs_vllm_on_the_gpu_cluster(job, tasks, bundle):
    variables = bundle["variables"]
    vllm_pin = next(line.strip() for line in (ROOT / "requirements-gpu.txt").read_text().splitlines()
                    if line.startswith("vllm"))
    for key, task in tasks.items():
        new_cluster = cluster(job, task)
        gpu = "gpu" in resolve(new_cluster["spark_version"], variables)
        libraries = [resolve(str(lib.get("pypi", {}).get("package", "")), variables) for lib in runnable(task)["libraries"]]
        if key in GENERATION:
            assert argv(task)[argv(task).index("--backend") + 1] == "vllm", f"{key}: --backend vllm"
        if key in GENERATION | TRAINING:
            assert gpu and vllm_pin in libraries, f"{key}: GPU cluster with {vllm_pin}"
            assert new_cluster["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
            assert new_cluster["spark_conf"]["spark.locality.wait"] == "0"   # docs/data_plane.md: engines idle
        else:
            assert key in CPU_ONLY and not gpu and new_cluster["num_workers"] == 0, f"{key}: small CPU cluster"
            assert "--backend" not in argv(task)


def test_every_task_installs_the_bundle_wheel(bundle, tasks):
    assert bundle["artifacts"]["cai_lake"]["type"] == "whl"
    assert "pip wheel" in bundle["artifacts"]["cai_lake"]["build"]
    for key, task in tasks.items():
        assert {"whl": "../dist/*.whl"} in runnable(task)["libraries"], key


def test_every_variable_used_is_declared(bundle):
    declared = set(bundle["variables"])
    for path in [ROOT / "databricks.yml", *sorted((ROOT / "resources").glob("*.yml"))]:
        used = set(VAR.findall(path.read_text()))
        assert used <= declared, f"{path.name}: undeclared variable(s) {sorted(used - declared)}"
    for name, target in bundle["targets"].items():
        assert set(target.get("variables") or {}) <= declared, name
    refs = set(re.findall(r"\$\{resources\.(\w+)\.(\w+)\.", (ROOT / "resources/cai_pipeline.job.yml").read_text()))
    assert all(name in bundle["resources"].get(kind, {}) for kind, name in refs), refs


def test_registry_is_unity_catalog(bundle, job):
    for c in job["job_clusters"]:
        env = c["new_cluster"]["spark_env_vars"]
        assert env["MLFLOW_TRACKING_URI"] == "databricks" and env["MLFLOW_REGISTRY_URI"] == "databricks-uc"
    for var, short in [("sl_model", "cai_sl"), ("pm_model", "cai_pm"), ("rl_model", "cai_rl")]:
        assert bundle["variables"][var]["default"] == "${var.catalog}.${var.schema}." + short


def test_paths_point_into_the_synced_checkout_or_mirror_params(bundle, tasks):
    """Inputs read from the deployed files exist here; evaluation files keep params.yaml's ../shared/data layout."""
    variables = bundle["variables"]
    params_text = (ROOT / "params.yaml").read_text()
    for key, task in tasks.items():
        for arg in argv(task):
            if arg.startswith(("${var.files}", "${var.params}")):
                assert Path(resolve(arg, variables)).exists(), f"{key}: {arg}"
            if arg.startswith("${var.eval_data}/"):
                assert "shared/data/" + arg.removeprefix("${var.eval_data}/") in params_text, f"{key}: {arg}"
    eval_data = resolve("${var.eval_data}", variables)
    sources = yaml.safe_load(resolve(variables["prompt_sources"]["default"], variables))

    def as_params(s: dict) -> dict:   # the bundle's absolute paths and explicit defaults, as params.yaml says them
        path = s["path"].replace(eval_data, "../shared/data") if s["path"].startswith(eval_data) else \
            Path(s["path"]).relative_to(ROOT).as_posix()
        extra = {} if s["split"] == "hash" else {"split": s["split"], "limit": s["limit"], "seed": s["seed"]}
        return {"path": path, "kind": s["kind"], **extra}
    assert [as_params(s) for s in sources] == yaml.safe_load(params_text)["ingest"]["sources"]


def test_launcher_passes_the_exit_status(tmp_path):
    """A failed job (non-zero status) must fail the Databricks task, a passing one must not."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = ROOT / "launch/cai_task.py"
    unknown = subprocess.run([sys.executable, str(script), "no-such-job"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr
    ok = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
