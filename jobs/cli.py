"""`cai`: one command line for every job and tool.

    cai ingest --source FILE --kind red_team      prompts -> lake (bad rows quarantined)
    cai sl-generate --rounds 4                     SL-CAI critique -> revision on Spark
    cai gate sl|labels|prompts                     quality gate: exit 1 (and quarantine) on bad data
    cai sql "SELECT kind, count(*) FROM generation_events GROUP BY kind"
    cai status                                     tables, Delta versions, row counts, gate verdicts
    cai lineage cai-rl@champion                    a model version's tables, versions, gates, parents
    cai constitution validate FILE                 exit 1 with the reason when FILE is wrong
    cai constitution import --critiques A.json --comparisons B.json -o paper.yaml
    cai model prepare                              convert the embedded default model once

Every job reads its settings from params.yaml ([common] + its own section); flags win.
Run `cai JOB --help` for a job's flags.
"""
from __future__ import annotations

import importlib
import sys

from cai_lib.env import set_offline_env

JOBS = {  # subcommand -> module with main(argv)
    "ingest": "jobs.ingest",
    "sl-generate": "jobs.sl_generate",
    "sample-pairs": "jobs.sample_pairs",
    "label": "jobs.label",
    "eval-labeler": "jobs.eval_labeler",
    "gate": "jobs.gate",
    "train-sl": "jobs.train_sl",
    "train-pm": "jobs.train_pm",
    "train-rl": "jobs.train_rl",
    "evaluate": "jobs.evaluate",
    "promote": "jobs.promote",
}
TOOLS = {
    "sql": "jobs.tools:sql_main",
    "status": "jobs.tools:status_main",
    "constitution": "jobs.tools:constitution_main",
    "model": "jobs.tools:model_main",
    "lineage": "jobs.tools:lineage_main",
}


def _usage() -> str:
    return __doc__ or ""


def main(argv: list[str] | None = None) -> int:
    set_offline_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in JOBS:
        target = importlib.import_module(JOBS[cmd]).main
    elif cmd in TOOLS:
        mod, fn = TOOLS[cmd].split(":")
        target = getattr(importlib.import_module(mod), fn)
    else:
        print(f"cai: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return int(target(rest) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # user errors: say what and how to fix, no traceback
        print(f"cai {cmd}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
