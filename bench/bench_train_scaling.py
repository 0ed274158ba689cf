"""SFT throughput with 1 and 2 data-parallel processes (TorchDistributor, local mode, gloo on CPU)
on the same rows and the same global batch: samples/s of the optimizer steps and the ratio.

    .venv/bin/python bench/bench_train_scaling.py [--rows 32] [--steps 6] [--batch 8] [--threads 1]

Each process gets `--threads` torch threads (processes x threads <= cores). Samples/s counts the
train rows the steps consumed (steps x global batch) over train_seconds, the time of the optimizer
steps alone (no model load, no torchrun start, no save), as rank 0 measured it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from cai_lib.backends.models import resolve_model
    from cai_lib.runtime.session import get_spark
    from cai_lib.training.distributed import launch
    from cai_lib.training.sft import SFTSettings, train_sft
    get_spark("local[1]", "bench-train-scaling")   # TorchDistributor needs a session
    rows = [{"key": f"p{i}", "prompt": f"How long do I bake loaf {i}?",
             "response": f"Bake loaf {i} at 220 C for {20 + i} minutes, then let it cool."} for i in range(args.rows)]
    settings = SFTSettings(max_steps=args.steps, batch_size=args.batch, max_length=args.max_length,
                           heldout_fraction=0.0, torch_threads=args.threads, seed=7)
    model = resolve_model("default")
    print(f"cpu: {cpu_model()} x {os.cpu_count()}; SFT full, {args.rows} rows, {args.steps} steps x global batch "
          f"{args.batch}, max_length {args.max_length}, {args.threads} torch thread(s) per process")
    rates = {}
    for n in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            result = launch(train_sft, model, rows, settings, Path(tmp) / "out", processes=n)
        rates[n] = result.steps * args.batch / result.train_seconds
        print(f"{n} process(es): {result.train_seconds:.1f} s for {result.steps} steps, {rates[n]:.2f} samples/s, "
              f"losses {[round(x, 4) for x in result.train_losses]}")
    print(f"scaling ratio (2 processes / 1): {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
