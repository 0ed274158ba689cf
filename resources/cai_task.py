"""The entry point of every `cai_pipeline` task on Databricks: `cai SUBCOMMAND [FLAGS]` with its exit status.

    spark_python_task: {python_file: ./cai_task.py, parameters: [gate, sl, --lake, ...]}

`jobs.cli.main` returns the exit status (a failed gate returns 1). A python_wheel_task calls the
entry point and drops its return value, so a failed gate would pass; here a non-zero status
becomes SystemExit and fails the task, and the tasks after it do not run. The code (jobs,
cai_lib) comes from the installed cai-lake wheel. This file lives in resources/, not jobs/,
because Python puts the script's folder first on sys.path: from jobs/, `evaluate.py` and
friends would shadow packages of the same name (Hugging Face `evaluate`).
"""
import sys

from jobs.cli import main

status = main(sys.argv[1:])
if status:  # success returns normally; only a failure raises SystemExit
    sys.exit(status)
