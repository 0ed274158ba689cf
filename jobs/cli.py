"""`cai`: one command line for every job and tool. `cai --help` lists them; `cai COMMAND --help` gives
a command's flags. Every job reads its settings from params.yaml ([common] + its own section);
flags win, and a flag a command does not use is an error.

An expected error (bad input, a missing table or file, a job that failed its contract: a
ValueError, a FileNotFoundError or one of the project's own error classes) is one line on
stderr and exit 1, and so is a broken machine state (a full disk, a read-only lake, a table
Spark cannot read, a dead executor: cai_lib/runtime/broken_state.py). Anything else is a bug
and keeps its traceback; `cai --debug ...` shows the traceback of expected errors too.
"""
from __future__ import annotations

import atexit
import importlib
import os
import sys

from cai_lib.env import set_offline_env
from cai_lib.runtime.broken_state import explain
from cai_lib.runtime.session import LOG_LEVEL_ENV

# subcommand -> (module:function taking argv, what it does), in pipeline order
COMMANDS = {
    "ingest": ("jobs.ingest:main", "prompt files -> the prompts table (bad rows quarantined)"),
    "sl-generate": ("jobs.sl_generate:main", "SL-CAI on Spark: first answers, then critique -> revision rounds"),
    "gate": ("jobs.gate:main", "quality gate prompts|sl|labels (Great Expectations): exit 1 on bad data"),
    "train-sl": ("jobs.train_sl:main", "fine-tune the base model on sl_dataset -> registered cai-sl"),
    "sample-pairs": ("jobs.sample_pairs:main", "two responses per red-team prompt from the policy (cai-sl)"),
    "label": ("jobs.label:main", "AI feedback: soft A/B labels from log-probs, both orders -> preference_dataset"),
    "eval-labeler": ("jobs.eval_labeler:main", "the labeller vs held-out human labels and the HHH evaluation"),
    "train-pm": ("jobs.train_pm:main", "train the preference model on preference_dataset -> registered cai-pm"),
    "train-rl": ("jobs.train_rl:main", "PPO (or DPO) of cai-sl against cai-pm, KL to cai-sl -> registered cai-rl"),
    "evaluate": ("jobs.evaluate:main", "policies on held-out prompts: harmlessness, refusals, Elo"),
    "promote": ("jobs.promote:main", "alias champion (or challenger, with reasons) from the evaluation and lineage"),
    "review": ("jobs.review:review_main", "people review the AI labels in doubt: queue, verdicts -> review_events"),
    "serve": ("jobs.serve:serve_main", "MLflow's scoring server for a registered model (e.g. cai-rl@champion)"),
    "sql": ("jobs.tools:sql_main", "DuckDB SQL over the lake tables, by name"),
    "status": ("jobs.tools:status_main", "tables, versions, gate verdicts, registered models, headline metrics"),
    "lineage": ("jobs.tools:lineage_main", "a model version -> its tables, versions, gates, parents, commit"),
    "lake": ("jobs.lake_tools:lake_main", "check every table's health; restore a broken one (history is kept); adopt; optimize"),
    "constitution": ("jobs.tools:constitution_main", "validate a constitution file, or import the paper's JSON"),
    "model": ("jobs.tools:model_main", "prepare the embedded default model (once)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return ("usage: cai COMMAND [FLAGS]   (cai COMMAND --help for its flags)\n\n"
            "commands, in pipeline order:\n" + "\n".join(lines) + "\n\n"
            "Every job reads its settings from params.yaml ([common] + its own section); flags win, and a\n"
            "flag a command does not use is an error. `cai --debug COMMAND ...` shows tracebacks.")


def expected_error(exc: BaseException) -> bool:
    """Bad input or a failed contract, which the message explains: ValueError (every input and lake
    error of the project subclasses it), FileNotFoundError, or an error class of our own packages
    (LakeError, JobFailed). A KeyError, TypeError or bare RuntimeError is a bug: it needs its traceback."""
    own = type(exc).__module__.split(".")[0] in ("cai_lib", "jobs", "schemas")
    return isinstance(exc, (ValueError, FileNotFoundError)) or own


def main(argv: list[str] | None = None) -> int:
    set_offline_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv   # `cai --debug COMMAND ...` (or anywhere in the line): no command has such a flag
    argv = [a for a in argv if a != "--debug"]
    os.environ.setdefault(LOG_LEVEL_ENV, "ERROR" if debug else "OFF")   # Spark's log: see broken_state.py
    if not debug:   # a Rust panic in delta-rs (its way to report some I/O failures) prints no stack either
        os.environ["RUST_BACKTRACE"] = "0"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"cai: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, fn = COMMANDS[cmd][0].split(":")
    target = getattr(importlib.import_module(module), fn)
    try:
        return int(target(rest) or 0)
    except BrokenPipeError:   # `cai lake check | head`: the reader left; stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - sorted below: expected errors are one line, bugs re-raise
        # BaseException: delta-rs reports some I/O failures (a full disk) as a Rust panic (pyo3's
        # PanicException derives from BaseException)
        why = None if debug or isinstance(exc, ValueError) else explain(exc, lake_of(rest))
        if why is None and (debug or not expected_error(exc)):
            raise
        print(f"cai {cmd}: error: {why or exc}", file=sys.stderr)   # say what and how to fix, no traceback
        return 1


def lake_of(argv: list[str]) -> str:
    """The --lake a command line names (the default `lake` otherwise), for messages about its state.

    >>> lake_of(["--limit", "3", "--lake", "/data/lake"]), lake_of(["--lake=s3://b/x"]), lake_of([])
    ('/data/lake', 's3://b/x', 'lake')
    """
    for i, arg in enumerate(argv):
        if arg == "--lake" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--lake="):
            return arg.split("=", 1)[1]
    return "lake"


def console() -> None:
    """The `cai` program (and `python -m jobs.cli`): main(), Python's own exit clean-up (atexit: MLflow's run,
    Spark's gateway, logging), then the process ends without running native static destructors. pyarrow's and
    delta-rs's thread pools can still be tearing down then, and their destructors then abort a process whose
    work is done and printed ("terminate called without an active exception", exit 134; apache/arrow#34314,
    delta-io/delta-rs#2184): it hit `cai lineage` once in CI. Tests call main() in process instead."""
    try:
        rc = main()
    except SystemExit as done:   # argparse: --help (0) or a usage error (2)
        rc = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, (int, type(None))):
            print(done.code, file=sys.stderr)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):   # the reader left, or the stream is closed: nothing to save
            pass
    os._exit(rc)


if __name__ == "__main__":
    console()
