"""The shape of the code: one-way layering, no import cycle, no private name crossing a module,
every module findable from its package's index and from docs/architecture.md. Pure: reads source."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from jobs.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package`."""
    out = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(f: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import in the file, at any depth (lazy imports count too)."""
    out = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names)
    return out


LIB, JOBS, SCHEMAS = modules("cai_lib"), modules("jobs"), modules("schemas")


def test_layers_point_one_way():
    for name, f in LIB.items():
        bad = [(m, line) for m, _, line in imports(f) if m.split(".")[0] in ("jobs", "tests", "bench")]
        assert not bad, f"{name} (the library) imports the application: {bad}"
    for name, f in SCHEMAS.items():
        bad = [(m, line) for m, _, line in imports(f) if m.split(".")[0] in ("cai_lib", "jobs", "tests")]
        assert not bad, f"{name} (the leaf) imports our code: {bad}"


def _target(module: str, names: list[str], known: dict) -> list[str]:
    """The modules of ours an import statement loads (`from pkg import mod` loads pkg.mod)."""
    if module not in known:
        return []
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
    return subs or [module]


def test_no_import_cycle():
    known = {**LIB, **JOBS, **SCHEMAS}
    graph = {m: {t for mod, names, _ in imports(f) for t in _target(mod, names, known) if t != m}
             for m, f in known.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t] if t in path else [m, t]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_private_name_crosses_a_module():
    for name, f in {**LIB, **JOBS}.items():
        for mod, names, line in imports(f):
            if mod.split(".")[0] in ("cai_lib", "jobs", "schemas"):
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                assert not private, f"{f.relative_to(ROOT)}:{line} imports private {private} from {mod}"


def test_every_module_is_listed_by_its_package_and_the_architecture_doc():
    doc = (ROOT / "docs/architecture.md").read_text()
    packages = sorted({m.rsplit(".", 1)[0] for m in LIB if m.count(".") >= 2})
    assert packages == ["cai_lib.backends", "cai_lib.constitution", "cai_lib.feedback", "cai_lib.lake",
                        "cai_lib.quality", "cai_lib.registry", "cai_lib.review", "cai_lib.runtime", "cai_lib.sl", "cai_lib.sources",
                        "cai_lib.training"]
    for pkg in packages:
        index = ast.get_docstring(ast.parse(LIB[pkg].read_text())) or ""
        mods = [m.rsplit(".", 1)[1] for m in LIB if m.rsplit(".", 1)[0] == pkg]
        for mod in mods:
            assert mod in index, f"{pkg}: module {mod} is not listed in its package's docstring"
            assert mod in doc, f"docs/architecture.md does not mention {pkg}.{mod}"


def test_every_job_is_a_command_and_in_the_architecture_doc():
    doc = (ROOT / "docs/architecture.md").read_text()
    job_files = {f.stem for f in (ROOT / "jobs").glob("*.py")} - {"__init__", "cli", "common", "tools"}
    targets = {t.split(":")[0].removeprefix("jobs.") for t, _ in COMMANDS.values()}
    assert job_files <= targets, f"job files without a `cai` command: {sorted(job_files - targets)}"
    for stem in job_files:
        assert f"jobs/{stem}.py" in doc, f"docs/architecture.md has no row for jobs/{stem}.py"


def test_no_module_is_over_400_lines():
    long = {str(f.relative_to(ROOT)): n for f in [*LIB.values(), *JOBS.values()]
            if (n := len(f.read_text().splitlines())) > 400}
    assert not long, f"split these: {long}"
