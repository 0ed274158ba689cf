"""The one file spark-submit and Databricks run: `cai SUBCOMMAND [FLAGS]`, with its exit status.

    spark-submit --master local[2] launch/cai_task.py sl-generate --lake lake --rounds 1
    spark-submit --master spark://HOST:7077 launch/cai_task.py label --lake /shared/lake --backend vllm
    Databricks: spark_python_task: {python_file: ../launch/cai_task.py, parameters: [gate, sl, --lake, ...]}

Why this file and not `spark-submit jobs/<job>.py`: Python puts the script's folder first on
sys.path, and from jobs/ the job files shadow packages of the same name (`jobs/evaluate.py`
hides Hugging Face `evaluate`). This folder holds nothing else, so nothing can be shadowed.
`jobs.cli.main` returns the exit status (a failed gate returns 1); a Databricks
python_wheel_task would drop it, so here a non-zero status becomes SystemExit and fails the
task, and the tasks after it do not run. The code (jobs, cai_lib) comes from the installed
cai-lake package (`pip install .` or the bundle's wheel).
"""
import sys

from jobs.cli import main

status = main(sys.argv[1:])
if status:  # success returns normally; only a failure raises SystemExit
    sys.exit(status)
