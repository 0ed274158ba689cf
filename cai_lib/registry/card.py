"""The model card of a registered version, where the MLflow UI shows it: the version's description
(markdown) says what it was trained on (constitution, every table + Delta version through its
ancestors), the gate verdicts it relied on (waivers, promotion blockers), the labeller's agreement
with human labels, its evaluation figures with their intervals and the promotion decision with its
reasons; model-version tags (`card.*`, `eval.*`, `promotion.*`) carry the same for machines.

`render_card` is pure (a lineage dict, see lineage.py, + optional evaluation and decision);
`write_card` renders a version's card from the registry and the lake and stores it.
"""
from __future__ import annotations

import json

from cai_lib.lake.tables import Lake
from cai_lib.registry.lineage import flatten, lineage

FIGURES = ("harmlessness", "helpfulness_proxy", "over_refusal", "refusal_rate_red_team", "elo")


def evaluation_summary(evaluation: dict, name: str, baseline: str | None = None, gain: dict | None = None) -> dict:
    """The card's evaluation of model `name` from `cai evaluate`'s metrics JSON: each figure as
    [value, interval], beside the baseline's, with the paired harmlessness gain (cai promote's).

    >>> ev = {"models": {"rl": {"model": "cai-rl/1", "harmlessness": 0.5, "harmlessness_ci": [0.4, 0.6]}},
    ...       "elo": {"rl": 1010.0}, "elo_ci": {"rl": [990.0, 1030.0]}, "prompts": 4, "interval": "95%"}
    >>> evaluation_summary(ev, "rl")["figures"]
    {'harmlessness': [0.5, [0.4, 0.6]], 'elo': [1010.0, [990.0, 1030.0]]}
    """
    def figures(n: str) -> dict:
        m = evaluation.get("models", {}).get(n, {})
        out = {k: [m.get(k), m.get(f"{k}_ci")] for k in FIGURES if m.get(k) is not None}
        if evaluation.get("elo", {}).get(n) is not None:
            out["elo"] = [evaluation["elo"][n], evaluation.get("elo_ci", {}).get(n)]
        return out
    models = evaluation.get("models", {})
    out = {"name": name, "model": models.get(name, {}).get("model"), "prompts": evaluation.get("prompts"),
           "interval": evaluation.get("interval"), "figures": figures(name)}
    if baseline and baseline in models:
        out["baseline"] = {"name": baseline, "model": models[baseline].get("model"), "figures": figures(baseline)}
    if gain:
        out["harmlessness_gain"] = gain
    return out


def _num(v, digits: int = 3) -> str:
    """0.123 / [0.100, 0.200] / - for a value, an interval or nothing.

    >>> _num(0.12345), _num([0.1, 0.2]), _num(None), _num(1012.46, 1)
    ('0.123', '[0.100, 0.200]', '-', '1012.5')
    """
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_num(x, digits) for x in v) + "]"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _fig(pair, digits: int = 3) -> str:
    if not pair or pair[0] is None:
        return "-"
    value, ci = pair
    return _num(value, digits) + (f" {_num(ci, digits)}" if ci else "")


def _list(names) -> str:
    return ", ".join(names) if names else "-"


def _constitution(flat: dict, constitutions: dict) -> list[str]:
    if not flat["constitution_shas"]:
        return ["## Constitution", "", "none recorded (trained without constitution-made data)", ""]
    return ["## Constitution", "", *(f"- `{constitutions.get(sha) or 'unknown id'}` sha256 `{sha}`"
                                     for sha in flat["constitution_shas"]), ""]


def _inputs(flat: dict) -> list[str]:
    rows = [f"| {i.model} | {i.table} | {'absent' if i.version is None else i.version} |" for i in flat["inputs"]]
    return ["## Trained on (with its ancestors)", "", "| model | table | Delta version |", "|---|---|---|", *rows, ""]


def promotable(flat: dict) -> bool:
    """Every gate verdict in the ancestry passed and lets its models be promoted (and there is one)."""
    return bool(flat["gates"]) and all(g.passed == "True" and g.promotable == "True" for g in flat["gates"])


def _gates(info: dict, flat: dict) -> list[str]:
    out = ["## Gate verdicts", ""]
    if not flat["gates"]:
        return out + ["none: trained with --no-require-gates, so it cannot be promoted", ""]
    out += ["| model | gate | passed | promotable | promotion blockers | waived |", "|---|---|---|---|---|---|"]
    out += [f"| {g.model} | {g.stage} | {g.passed} | {g.promotable} | {_list(g.blockers)} | {_list(g.waived)} |"
            for g in flat["gates"]]
    blocked = [f"{g.model} `{g.stage}`" + (f" ({_list(g.blockers)})" if g.blockers else "")
               for g in flat["gates"] if g.passed != "True" or g.promotable != "True"]
    out += ["", f"Promotable by its data: **{'yes' if promotable(flat) else 'no'}**"
            + (f", blocked by {'; '.join(blocked)}" if blocked else "")]
    failures = [f"- {key} `{stage}`: `{f['check']}` {f['status']} (blocks {f['blocks']})"
                + (f", bad rows {f['bad_rows']}" if f.get("bad_rows") is not None else
                   f", observed {_num(f['observed'])}" if f.get("observed") is not None else "")
                + (f"; {f['note']}" if f.get("note") else "")
                for key, node in _nodes(info) for stage, g in sorted(node["gates"].items())
                for f in g.get("failures", [])]
    return out + (["", "Blocking checks:", *failures] if failures else []) + [""]


def _labeller(flat: dict) -> list[str]:
    if not flat["labeller"]:
        return []
    out = ["## Labeller vs human labels", ""]
    for lab in flat["labeller"]:
        f = lab.figures
        if not f.get("evaluated"):
            out.append(f"- {lab.model} `{lab.stage}` gate: not measured (the gate ran without a labeller evaluation)")
        elif "human_accuracy" not in f:
            out.append(f"- {lab.model} `{lab.stage}` gate: evaluation {f.get('eval_metrics_sha')}, figures not "
                       f"recorded: {f.get('missing')}")
        else:
            out.append(f"- {lab.model} `{lab.stage}` gate: agreement {_fig([f['human_accuracy'], f.get('human_accuracy_ci')])}"
                       f" on {f.get('human_n')} human pairs, ECE {_fig([f.get('human_ece'), f.get('human_ece_ci')])}, "
                       f"swap consistency {_fig([f.get('swap_consistency'), f.get('swap_consistency_ci')])} "
                       f"(evaluation {f['eval_metrics_sha']})")
    return out + [""]


def _nodes(info: dict, seen: set | None = None):
    """(model version, lineage dict) of the version and each ancestor reached, once each, as flatten orders them."""
    seen = set() if seen is None else seen
    if "ref" in info:
        return
    key = f"{info['model']}/{info['version']}"
    if key in seen:
        return
    seen.add(key)
    yield key, info
    for _, parent in sorted(info.get("ancestors", {}).items()):
        yield from _nodes(parent, seen)


def _ancestry(info: dict, role: str | None = None, indent: str = "") -> list[str]:
    head = f"{indent}- {role + ': ' if role else ''}"
    if "ref" in info:
        return [f"{head}{info['ref']} ({'a cycle: already above' if info.get('cycle') else info.get('missing')})"]
    line = (f"{head}{info['model']}/{info['version']} ({info['job']}, run `{info['run_id'][:12]}`, "
            f"git `{(info['git_commit'] or '-')[:12]}`, base model `{info['base_model']}`)")
    out = [line]
    walked = info.get("ancestors", {})
    for r, parent in sorted(info["parents"].items()):
        out += _ancestry(walked[r], r, indent + "  ") if r in walked else [f"{indent}  - {r}: {parent}"]
    return out


HEADLINE = ("accuracy", "loss_after", "_ece", "last_reward_mean", "last_kl_mean", "last_refusal_rate")


def _metrics(info: dict) -> list[str]:
    shown = {k: v for k, v in info["metrics"].items() if any(h in k for h in HEADLINE)}
    return ["## Training metrics", "", ", ".join(f"{k}={v:.4g}" for k, v in shown.items()), ""] if shown else []


def _evaluation(ev: dict | None) -> list[str]:
    out = ["## Evaluation", ""]
    if not ev:
        return out + ["not evaluated yet: `cai evaluate`, then `cai promote`", ""]
    base = ev.get("baseline")
    out += [f"Evaluated as `{ev['name']}` ({ev['model']}) on {ev.get('prompts')} prompts; intervals: {ev.get('interval')}.",
            "", f"| figure | {ev['name']} ({ev['model']}) |" + (f" {base['name']} ({base['model']}) |" if base else ""),
            "|---|---|" + ("---|" if base else "")]
    for k in FIGURES:
        if k in ev["figures"] or (base and k in base["figures"]):
            digits = 1 if k == "elo" else 3
            out.append(f"| {k} | {_fig(ev['figures'].get(k), digits)} |"
                       + (f" {_fig(base['figures'].get(k), digits)} |" if base else ""))
    g = ev.get("harmlessness_gain")
    if g:
        out += ["", f"Harmlessness gain over {base['name'] if base else 'the baseline'}: {g['mean']:+.4f} "
                    f"[{g['ci'][0]:+.4f}, {g['ci'][1]:+.4f}] ({g['level']:.0%} paired bootstrap, {g['prompts']} "
                    "red-team prompts)"]
    return out + [""]


def _decision(d: dict | None) -> list[str]:
    out = ["## Promotion", ""]
    if not d:
        return out + ["not decided yet: `cai promote`", ""]
    when = f", decided {d['decided_at']}" if d.get("decided_at") else ""
    if d.get("promoted"):
        return out + [f"**{d['alias']}** (promoted{when}): every promotion rule passed", ""]
    return out + [f"**{d['alias']}** (not promoted{when}), because:", *(f"- {r}" for r in d.get("reasons", [])), ""]


def render_card(info: dict, evaluation: dict | None = None, decision: dict | None = None,
                constitutions: dict | None = None) -> str:
    """The markdown card of a lineage dict (depth=None for the whole ancestry); `evaluation` as
    evaluation_summary makes it, `decision` as cai promote writes it, `constitutions` {sha: id}."""
    flat = flatten(info)
    lines = [f"# {info['model']} v{info['version']}", "",
             f"Trained by `{info['job']}` in MLflow run `{info['run_id']}` at git `{info['git_commit']}`, "
             f"base model `{info['base_model']}`.", "",
             *([f"Weights sha256 `{info['weights_sha256']}`: every load (pyfunc, `mlflow models serve`) checks it.", ""]
               if info.get("weights_sha256") else []),
             *_constitution(flat, constitutions or {}), *_inputs(flat), *_gates(info, flat),
             *_labeller(flat), "## Ancestry", "", *_ancestry(info), "",
             *(["Not reached (lineage unknown): " + "; ".join(f"{r}: {why}" for r, why in flat["unreached"]), ""]
               if flat["unreached"] else []),
             *_metrics(info), *_evaluation(evaluation), *_decision(decision)]
    return "\n".join(lines).rstrip() + "\n"


def card_tags(info: dict, evaluation: dict | None = None, decision: dict | None = None,
              constitutions: dict | None = None) -> dict[str, str]:
    """The card's machine-readable half, as model-version tags (JSON where a value is a list)."""
    flat = flatten(info)
    tags = {"card.constitution_sha": ",".join(flat["constitution_shas"]),
            "card.constitution_id": ",".join((constitutions or {}).get(s) or "unknown" for s in flat["constitution_shas"]),
            "card.ancestors": ",".join(flat["models"][1:]),
            "card.inputs": json.dumps([list(i) for i in flat["inputs"]]),
            "card.gates": json.dumps([g._asdict() for g in flat["gates"]]),
            "card.promotable": str(promotable(flat)),
            "card.labeller": json.dumps([{"model": lab.model, "stage": lab.stage, **lab.figures}
                                         for lab in flat["labeller"]], sort_keys=True)}
    for k, pair in ((evaluation or {}).get("figures") or {}).items():
        tags[f"eval.{k}"], tags[f"eval.{k}_ci"] = str(pair[0]), json.dumps(pair[1])
    if evaluation and evaluation.get("harmlessness_gain"):
        tags["eval.harmlessness_gain"] = json.dumps(evaluation["harmlessness_gain"], sort_keys=True)
    if decision:
        tags.update({"promotion.decision": decision["alias"], "promotion.promoted": str(bool(decision.get("promoted"))),
                     "promotion.reasons": json.dumps(decision.get("reasons", []))})
    return tags


def constitution_ids(lake: Lake | None, shas: list[str]) -> dict[str, str]:
    """{sha: constitution id} from the events that used them (the datasets keep only the sha)."""
    out: dict[str, str] = {}
    for table in ("generation_events", "label_events"):
        if lake is None or len(out) == len(shas) or not lake.exists(table):
            continue
        t = lake.read(table, columns=["constitution_sha", "constitution_id"])
        pairs = t.group_by(["constitution_sha", "constitution_id"]).aggregate([]).to_pylist()
        out.update({p["constitution_sha"]: p["constitution_id"] for p in pairs
                    if p["constitution_sha"] in shas and p["constitution_sha"] not in out})
    return out


def write_card(name: str, version: str, lake: Lake | None = None, evaluation: dict | None = None,
               decision: dict | None = None) -> str:
    """Render a registered version's card from its whole lineage and store it as the version's
    description and tags (a new evaluation or decision rewrites it); returns the markdown."""
    import mlflow
    info = lineage(f"{name}:{version}", lake, depth=None)
    constitutions = constitution_ids(lake, flatten(info)["constitution_shas"])
    text = render_card(info, evaluation, decision, constitutions)
    client = mlflow.MlflowClient()
    client.update_model_version(name, version, description=text)
    for key, value in card_tags(info, evaluation, decision, constitutions).items():
        client.set_model_version_tag(name, version, key, value)
    return text
