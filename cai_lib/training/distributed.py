"""Data-parallel training through Spark's TorchDistributor: one launcher for SFT, the PM, PPO and DPO.

    cai train-sl --num-processes 2                         2 processes on this machine (gloo on CPU)
    cai train-sl --num-processes 8 --distributed cluster   one process per Spark task (spark-submit, Databricks)

`launch(fn, *args, processes=N, mode=...)` calls `fn(*args)` directly for N=1 (today's
single process, no torchrun, no Spark session). For N>1 it runs `fn` under torchrun through
`pyspark.ml.torch.distributor.TorchDistributor` (`local_mode=True` on the driver's machine,
`False` on the executors) and returns rank 0's result. Inside `fn`, `ranks()` says which
rank this is; the trainers use it to
- take their slice `group[rank::world]` of every global step (the DistributedSampler rule:
  the step schedule is drawn from the shared seed, so N ranks train on exactly the rows one
  process would, each a 1/N share), normalise the loss by the whole step's count, and sum
  the gradients with one all-reduce of the flattened gradients per optimizer step. That is
  DDP's arithmetic, done once per step rather than in DDP's backward hooks, because a rank
  whose share of a short last step is empty must still join the reduction (DDP's hooks only
  fire on a backward pass). No FSDP: the models here fit one device;
- seed per rank (`rank_seed`) what must differ (rollout sampling), and share what must not
  (weight init, the step schedule); start from rank 0's weights (`broadcast_`);
- let rank 0 alone call on_step (MLflow, via `RankZeroLogger`) and save; the driver
  registers only after every rank has returned.

A rank that raises writes its error to the launch's error folder before torchrun stops the
others; `launch` then raises RankFailed naming the first failing rank and its error.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from cai_lib.config import opt

__all__ = ["DistributedConfig", "RankFailed", "Ranks", "ranks", "launch", "rank_seed", "rank_device",
           "RankZeroLogger"]

MODES = ("local", "cluster")
ROOT = Path(__file__).resolve().parents[2]   # the repository root: the ranks import cai_lib from here


@dataclass
class DistributedConfig:
    """The two fields every training job adds: how many data-parallel processes, and where."""
    num_processes: int = opt(1, "data-parallel training processes: 1 = one process, no torchrun; N > 1 runs under "
                                "Spark's TorchDistributor (gloo on CPU, nccl on GPU: one process per GPU), the "
                                "same global batch split N ways", lo=1, hi=4096)
    distributed: str = opt("local", "where the N processes run: local = on this machine (local_mode=True); cluster "
                                    "= one per Spark task on the executors (spark-submit or Databricks; --work-dir "
                                    "must be storage every node sees)", choices=MODES)

    def launch(self, fn: Callable, *args: Any) -> Any:
        """fn(*args) on num_processes ranks (see `launch`); rank 0's result."""
        return launch(fn, *args, processes=self.num_processes, mode=self.distributed,
                      work_dir=getattr(self, "work_dir", None))

    def step_logger(self) -> Callable[[int, dict], None]:
        """on_step that logs a step's metrics to the active MLflow run: directly in one process,
        from rank 0 into the driver's run when distributed."""
        from cai_lib.registry.tracking import log_step_metrics
        return log_step_metrics if self.num_processes == 1 else RankZeroLogger.active()

    def describe_processes(self) -> str:
        return "" if self.num_processes == 1 else f" on {self.num_processes} processes ({self.distributed})"

    def check_distributed(self) -> None:
        """Refuse what cannot work before any data is read."""
        if self.num_processes > 1 and self.distributed == "cluster" and not getattr(self, "work_dir", None):
            raise ValueError("--distributed cluster needs --work-dir on storage every node sees (e.g. /dbfs/... or "
                             "/Volumes/...): rank 0 saves the weights there and the driver registers them")


class RankFailed(ValueError):
    """A training rank raised: the job exits 1 with that rank's error; nothing is registered."""


# ---------------------------------------------------------------- inside a rank

@dataclass(frozen=True)
class Ranks:
    """This process's place in the training group; Ranks() is the single-process group."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This rank's share of one global step: items[rank::world] (may be empty on a short step)."""
        return list(items[self.rank::self.world])

    def sum_(self, *values: float) -> list[float]:
        """The sums over all ranks of a few scalars (one all-reduce)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sum_grads_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every gradient over the ranks, in place: one all-reduce of one flat buffer (a rank that
        ran no rows this step contributes zeros)."""
        if self.world == 1:
            return
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def broadcast_(self, params: Iterable[torch.Tensor]) -> None:
        """Every rank starts from rank 0's values (what DDP does at wrap time)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, 0)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's rows [n_r, ...] in rank order (sizes may differ by rank)."""
        if self.world == 1:
            return local
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, torch.tensor([local.shape[0]]))
        width = max(int(s) for s in sizes)
        padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype)
        padded[:local.shape[0]] = local.cpu()
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]).to(local.device)

    def interleave(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Rows of `local` (this rank's shard items[rank::world]) gathered back into the order of items."""
        if self.world == 1:
            return local
        gathered = self.gather(local)
        order = [i for r in range(self.world) for i in range(r, n, self.world)]
        out = torch.empty_like(gathered)
        out[torch.tensor(order, dtype=torch.long, device=out.device)] = gathered
        return out


def ranks() -> Ranks:
    """The running group: Ranks(rank, world) under torchrun, Ranks() in a plain process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Ranks()


def rank_seed(seed: int, group: Ranks) -> int:
    """A per-rank seed for what must differ between ranks (dropout, sampling); rank 0 of any
    group, and a single process, keep `seed` itself."""
    return seed + 1_000_003 * group.rank


def rank_device(device: torch.device) -> torch.device:
    """On GPUs one process per GPU: rank r of a node takes cuda:LOCAL_RANK (TorchDistributor sets
    CUDA_VISIBLE_DEVICES to the GPUs it owns). CPU stays CPU."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and ranks().world > 1:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@dataclass
class RankZeroLogger:
    """on_step for a distributed run: rank 0 logs the step's metrics into the driver's MLflow run
    (picklable: tracking URI and run id, not the driver's active-run state)."""
    tracking_uri: str
    run_id: str

    def __call__(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient
        now = int(time.time() * 1000)
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)])

    @classmethod
    def active(cls) -> "RankZeroLogger":
        import mlflow
        return cls(mlflow.get_tracking_uri(), mlflow.active_run().info.run_id)


# ---------------------------------------------------------------- the driver

def launch(fn: Callable, *args: Any, processes: int = 1, mode: str = "local", work_dir: str | None = None) -> Any:
    """fn(*args) in one process (processes=1) or under TorchDistributor on `processes` ranks;
    returns rank 0's result. A failing rank raises RankFailed with its error."""
    if processes == 1:
        return fn(*args)
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r} is not one of {MODES}")
    from pyspark.ml.torch.distributor import TorchDistributor
    _spark_session(mode)
    if work_dir:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cai-ranks-", dir=work_dir) as errors, _rank_env():
        distributor = TorchDistributor(num_processes=processes, local_mode=mode == "local",
                                       use_gpu=torch.cuda.is_available())
        try:
            return distributor.run(_rank_main, fn, args, errors)
        except RuntimeError as exc:
            raise RankFailed(_failure(Path(errors), processes, exc)) from None


def _spark_session(mode: str):
    """The running session (the job's, spark-submit's, Databricks'); local mode starts a small one."""
    from pyspark.sql import SparkSession
    spark = SparkSession.getActiveSession()
    if spark is None and "PYSPARK_GATEWAY_PORT" not in os.environ and mode == "cluster":
        raise ValueError("--distributed cluster runs on the executors of a Spark application: start the job "
                         "with spark-submit launch/cai_task.py (or as a Databricks task), or use --distributed local")
    if spark is None:
        from cai_lib.runtime.session import get_spark
        spark = get_spark("local[1]", "cai-train")
    return spark


@contextlib.contextmanager
def _rank_env():
    """torchrun's children inherit os.environ: put the repository root on PYTHONPATH (the ranks unpickle
    cai_lib functions) and the offline variables in place for the time of the run."""
    from cai_lib.env import set_offline_env
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), old) if p)
    set_offline_env()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _rank_main(fn: Callable, args: tuple, errors: str) -> Any:
    """One rank: join the group (nccl on GPU, gloo on CPU), run fn, record an error for the driver."""
    import traceback
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank()
    try:
        out = [fn(*args)]
        # every rank writes its return value to the same file (pyspark's run script): hand them all
        # rank 0's, so whichever write lands last, the driver reads rank 0's result. This is also the
        # barrier: no rank returns (and the driver registers nothing) before every rank is done.
        torch.distributed.broadcast_object_list(out, 0)
        return out[0]
    except BaseException as exc:
        line = f"{time.time():.6f} {type(exc).__name__}: {exc}"
        Path(errors, f"rank-{rank}.txt").write_text(line + "\n" + traceback.format_exc())
        raise
    finally:
        torch.distributed.destroy_process_group()


def _failure(errors: Path, processes: int, exc: Exception) -> str:
    """'rank 1 of 2 failed: ValueError: ...': the first rank to fail (the others were stopped by it)."""
    found = []
    for f in errors.glob("rank-*.txt"):
        first = f.read_text().splitlines()[0]
        stamp, _, message = first.partition(" ")
        found.append((float(stamp), int(f.stem.split("-")[1]), message))
    if not found:
        tail = str(exc).strip().splitlines()[-1:] or [""]
        return (f"distributed training ({processes} processes) failed before any rank reported an error: "
                f"{tail[0]}; see the job's output above")
    _, rank, message = min(found)
    others = sorted(r for _, r, _ in found if r != rank)
    also = f" (then rank(s) {others} stopped with it)" if others else ""
    return f"rank {rank} of {processes} failed: {message}{also}; nothing was registered"
