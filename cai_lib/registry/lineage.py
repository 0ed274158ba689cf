"""Lineage of a registered model version: its run, the tables and Delta versions it read, the gate
verdicts it relied on, its parent models and the commit it was trained at, and, through its
parents, the same for its whole ancestry (`depth`); `flatten` lists what that ancestry reached."""
from __future__ import annotations

import json
from typing import NamedTuple

from cai_lib.lake.tables import Lake
from cai_lib.registry.models import model_version


class Input(NamedTuple):
    """One table a model version in the ancestry read, at its Delta version."""
    model: str
    table: str
    version: int | None


class Gate(NamedTuple):
    """One gate verdict a model version in the ancestry relied on (tags as MLflow stores them:
    "True" / "False" / "None")."""
    model: str
    stage: str
    passed: str | None
    promotable: str | None
    blockers: list[str]
    waived: list[str]


class Labeller(NamedTuple):
    """The labeller's agreement with human labels, as the labels gate judged it for a model version."""
    model: str
    stage: str
    figures: dict


def is_registered_ref(parent: str) -> bool:
    """A parent tag names a registered version ("cai-sl/1"), not a folder or a hub id ("/models/x",
    "./x", "HuggingFaceTB/SmolLM2-135M-Instruct" is ruled out by the version after the slash).

    >>> [is_registered_ref(p) for p in ("cai-sl/1", "/data/model", "./model", "default", "org/model")]
    [True, False, False, False, False]
    """
    name, _, version = parent.partition("/")
    return bool(name) and version.isdigit() and not parent.startswith(("/", "."))


def lineage(ref: str, lake: Lake | None = None, depth: int | None = None) -> dict:
    """From a model version to its run, input tables + versions, gate verdicts, parents and commit;
    `ancestors` holds each registered parent's own lineage, `depth` levels down (None: all the way;
    1: this version only, its parents named in `parents` but not walked)."""
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be >= 1 (1 = this version, its parents by name only), got {depth}; "
                         "omit it to walk the whole ancestry")
    return _walk(ref, lake, depth, ())


def _walk(ref: str, lake: Lake | None, depth: int | None, path: tuple[str, ...]) -> dict:
    info = _one(ref, lake)
    key = f"{info['model']}/{info['version']}"
    info["ancestors"] = {}
    if depth == 1:
        return info
    for role, parent in sorted(info["parents"].items()):
        if not is_registered_ref(parent):
            continue
        if parent in path or parent == key:   # a tag edited by hand could loop: stop, and say so
            info["ancestors"][role] = {"ref": parent, "cycle": True}
            continue
        try:
            info["ancestors"][role] = _walk(parent, lake, None if depth is None else depth - 1, (*path, key))
        except ValueError as exc:   # deleted, or another store's: say so, keep the rest of the walk
            info["ancestors"][role] = {"ref": parent, "missing": str(exc)}
    return info


def _one(ref: str, lake: Lake | None) -> dict:
    """One version's own lineage, from its run's tags and dataset inputs (+ gate_events rows)."""
    import mlflow
    mv = model_version(ref)
    client = mlflow.MlflowClient()
    run = client.get_run(mv.run_id)
    tags = run.data.tags
    inputs = {}
    for d in run.inputs.dataset_inputs:
        src = json.loads(d.dataset.source)
        inputs[d.dataset.name.split("@")[0]] = {"version": src.get("delta_table_version"), "path": src.get("path")}
    registered = client.get_registered_model(mv.name).aliases or {}
    aliases = [a for a, v in registered.items() if str(v) == str(mv.version)]
    return {"model": mv.name, "version": str(mv.version), "aliases": sorted(aliases), "run_id": mv.run_id,
            "weights_sha256": (mv.tags or {}).get("weights_sha256"),   # what every load checks (serving.py)
            "job": tags.get("cai.job"), "git_commit": tags.get("git_commit"),
            "constitution_sha": tags.get("constitution_sha"), "base_model": tags.get("base_model"),
            "parents": {k.removeprefix("parent."): v for k, v in tags.items() if k.startswith("parent.")},
            "inputs": inputs, "gates": _gates(tags, lake),
            "metrics": {k: round(v, 6) for k, v in sorted(run.data.metrics.items())}}


def _gates(tags: dict, lake: Lake | None) -> dict:
    """{stage: verdict} from the run's gate.* tags, with the gate_events row's details when the lake is given."""
    rows = lake.read("gate_events").to_pylist() if lake is not None and lake.exists("gate_events") else []
    gates = {}
    for key, value in tags.items():
        if not (key.startswith("gate.") and key.endswith(".verdict_id")):
            continue
        stage = key.split(".")[1]
        gates[stage] = {"verdict_id": value, "passed": tags.get(f"gate.{stage}.passed"),
                        "promotable": tags.get(f"gate.{stage}.promotable"),
                        "promotion_blockers": _names(tags.get(f"gate.{stage}.promotion_blockers")),
                        "waived": _names(tags.get(f"gate.{stage}.waived"))}
        if f"gate.{stage}.labeller" in tags:
            gates[stage]["labeller"] = json.loads(tags[f"gate.{stage}.labeller"])
        row = next((r for r in rows if r["event_id"] == value), None)
        if row:
            gates[stage].update(checks=row["n_checks"], created_at=str(row["created_at"]),
                                input_versions=json.loads(row["input_versions"]),
                                failures=json.loads(row["failures"] or "[]"))
    return gates


def _names(joined: str | None) -> list[str]:
    return [x for x in (joined or "").split(",") if x]


def flatten(info: dict) -> dict:
    """The transitive closure of a lineage dict, each model version once (first reached, this one
    first): `models`, `inputs` (Input per table read), `gates` (Gate per verdict), `labeller`
    (Labeller per labels gate that measured agreement with human labels), `constitution_shas`, and
    `unreached`: (ref, why) per parent the registry no longer has (its lineage is unknown).

    >>> leaf = {"model": "cai-sl", "version": "1", "constitution_sha": "c1", "ancestors": {},
    ...         "inputs": {"sl_dataset": {"version": 4}}, "gates": {"sl": {"passed": "True", "promotable": "True"}}}
    >>> top = {"model": "cai-rl", "version": "2", "constitution_sha": "c1,c2", "inputs": {"prompts": {"version": 1}},
    ...        "gates": {}, "ancestors": {"policy": leaf, "reward_model": {"ref": "cai-rl/2", "cycle": True}}}
    >>> f = flatten(top)
    >>> f["models"], f["inputs"][1], f["constitution_shas"]
    (['cai-rl/2', 'cai-sl/1'], Input(model='cai-sl/1', table='sl_dataset', version=4), ['c1', 'c2'])
    >>> f["gates"]
    [Gate(model='cai-sl/1', stage='sl', passed='True', promotable='True', blockers=[], waived=[])]
    """
    out: dict = {"models": [], "inputs": [], "gates": [], "labeller": [], "constitution_shas": [], "unreached": []}
    _collect(info, out)
    return out


def _collect(info: dict, out: dict) -> None:
    if "missing" in info:
        out["unreached"].append((info["ref"], info["missing"]))
    if "ref" in info:   # a cycle or a missing version: nothing more to reach
        return
    key = f"{info['model']}/{info['version']}"
    if key in out["models"]:
        return
    out["models"].append(key)
    out["inputs"] += [Input(key, t, src.get("version")) for t, src in sorted(info["inputs"].items())]
    for stage, g in sorted(info["gates"].items()):
        out["gates"].append(Gate(key, stage, g.get("passed"), g.get("promotable"),
                                 list(g.get("promotion_blockers") or []), list(g.get("waived") or [])))
        if g.get("labeller"):
            out["labeller"].append(Labeller(key, stage, g["labeller"]))
    for sha in _names(info.get("constitution_sha")):
        if sha not in out["constitution_shas"]:
            out["constitution_shas"].append(sha)
    for _, parent in sorted(info.get("ancestors", {}).items()):
        _collect(parent, out)
