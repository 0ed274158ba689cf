"""What one engine's task asks of an executor off local mode, and how many engines the cluster runs at once.

Every task of a stage takes one task slot of the default profile (`spark.task.cpus` cores, and a GPU when
`spark.task.resource.gpu.amount` is set for all). An engine computes on more than that: its backend's
threads, or a GPU. So on a cluster the plane's model stages carry a task resource profile (Spark's
stage-level scheduling, `mapInArrow(..., profile=...)`): an engine task takes its engine's cores, and one GPU
on GPU executors. Delta's own jobs (the table state a commit reads, the commit's follow-up) keep the
default profile, so on executors with a core to spare they run beside the engines instead of waiting for a
chunk task to end (docs/data_plane.md, "Engines apart from Spark's task slots").

Local mode refuses task resource profiles, and dynamic allocation would need executor profiles too: there
every task keeps taking one slot, as before. `spark.cai.engineCpus` overrides the engine's cores (a
backend without threads of its own: vLLM, the fake one).
"""
from __future__ import annotations

ENGINE_CPUS = "spark.cai.engineCpus"


def _int(conf: dict, key: str, default: int) -> int:
    return int(float(conf.get(key) or default))


def engine_requests(conf: dict[str, str], threads: int) -> dict[str, float] | None:
    """{"cpus": n[, "gpu": 1.0]} that one engine's task asks for; None where the default task is that
    already, where the master is local (it refuses task profiles) or allocation is dynamic.

    An engine takes min(its threads, the executor's cores) cores (`spark.cai.engineCpus` wins over
    `threads`), never fewer than a default task; on executors with GPUs and no GPU in the default task,
    one GPU. Without `spark.executor.cores` an executor's size is unknown: no more cores are asked.

    >>> cluster = {"spark.master": "spark://h:7077", "spark.executor.cores": "3"}
    >>> engine_requests(cluster, 2), engine_requests({**cluster, "spark.master": "local[2]"}, 2)
    ({'cpus': 2}, None)
    >>> engine_requests({**cluster, "spark.executor.cores": "1"}, 2), engine_requests(cluster, 1)
    (None, None)
    >>> engine_requests({**cluster, "spark.executor.resource.gpu.amount": "1"}, 1)
    {'cpus': 1, 'gpu': 1.0}
    >>> engine_requests({**cluster, "spark.executor.resource.gpu.amount": "1",
    ...                  "spark.task.resource.gpu.amount": "1", ENGINE_CPUS: "2"}, 1)   # every task has a GPU
    {'cpus': 2}
    """
    master = conf.get("spark.master", "local")
    if master.startswith("local") or conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true":
        return None
    task_cpus, cores = _int(conf, "spark.task.cpus", 1), _int(conf, "spark.executor.cores", 0)
    want = _int(conf, ENGINE_CPUS, max(1, threads))
    cpus = max(task_cpus, min(want, cores)) if cores else task_cpus
    gpu = (_int(conf, "spark.executor.resource.gpu.amount", 0) > 0
           and float(conf.get("spark.task.resource.gpu.amount") or 0) == 0)
    if cpus == task_cpus and not gpu:
        return None
    return {"cpus": cpus, **({"gpu": 1.0} if gpu else {})}


def engine_slots(conf: dict[str, str], total_cores: int, requests: dict[str, float] | None,
                 executors: int = 0) -> int:
    """Engines the session runs at once: as many engine tasks (`requests`, else the default task) as fit on
    one executor, times the `executors`. On a local master `total_cores` (Spark's default parallelism); on a
    cluster whose tasks ask for no GPU, `total_cores` / `spark.task.cpus` unless `requests` say more.

    An executor's cores are `spark.executor.cores`, else its share of `total_cores`; its GPUs
    `spark.executor.resource.gpu.amount`.

    >>> cluster = {"spark.master": "spark://h:7077", "spark.executor.cores": "3"}
    >>> engine_slots(cluster, 6, None), engine_slots(cluster, 6, {"cpus": 2}), engine_slots(cluster, 12, {"cpus": 1})
    (6, 2, 12)
    >>> engine_slots({**cluster, "spark.task.cpus": "3"}, 6, None), engine_slots({"spark.master": "local[2]"}, 2, None)
    (2, 2)
    >>> gpus = {"spark.master": "spark://h:7077", "spark.executor.resource.gpu.amount": "1"}   # no executor.cores
    >>> engine_slots(gpus, 16, {"cpus": 1, "gpu": 1.0}, executors=2)   # two executors of 8 cores and one GPU
    2
    >>> engine_slots({**gpus, "spark.task.resource.gpu.amount": "1"}, 16, None, executors=2)   # every task a GPU
    2
    """
    task_gpu = float(conf.get("spark.task.resource.gpu.amount") or 0)
    if conf.get("spark.master", "local").startswith("local"):
        return max(1, total_cores)
    if requests is None and task_gpu == 0:
        return max(1, total_cores // _int(conf, "spark.task.cpus", 1))
    cores = _int(conf, "spark.executor.cores", 0) or (total_cores // executors if executors else 1)
    cpus, gpu = (requests["cpus"], requests.get("gpu", 0)) if requests else (_int(conf, "spark.task.cpus", 1), 0)
    return max(1, (executors or total_cores // cores) * _per_executor(conf, cores, int(cpus), (gpu, task_gpu)))


def _per_executor(conf: dict[str, str], cores: int, cpus: int, gpus: tuple[float, ...]) -> int:
    """Engine tasks of `cpus` cores that fit on an executor of `cores`, and of each GPU share in `gpus` (0: none)."""
    fit = cores // cpus
    for need in gpus:
        if need:
            fit = min(fit, int(_int(conf, "spark.executor.resource.gpu.amount", 0) // need))
    return fit


def delta_beside(conf: dict[str, str], requests: dict[str, float] | None) -> bool:
    """Whether a default task (Delta's jobs) still finds a core on an executor whose engines all run: then
    a commit never waits for an engine task to end, and the plane can queue a chunk job per engine.

    >>> cluster = {"spark.master": "spark://h:7077", "spark.executor.cores": "3"}
    >>> delta_beside(cluster, {"cpus": 2}), delta_beside({**cluster, "spark.executor.cores": "2"}, {"cpus": 2})
    (True, False)
    >>> delta_beside(cluster, None), delta_beside({"spark.master": "spark://h:7077"}, {"cpus": 2})
    (False, False)
    >>> gpus = {**cluster, "spark.executor.cores": "8", "spark.executor.resource.gpu.amount": "1"}
    >>> delta_beside(gpus, {"cpus": 1, "gpu": 1.0}), delta_beside({**gpus, "spark.task.resource.gpu.amount": "1"},
    ...                                                            {"cpus": 2})   # every task takes the GPU
    (True, False)
    """
    cores = _int(conf, "spark.executor.cores", 0)
    if requests is None or not cores or float(conf.get("spark.task.resource.gpu.amount") or 0) > 0:
        return False
    engines = _per_executor(conf, cores, int(requests["cpus"]), (requests.get("gpu", 0),))
    return cores - engines * int(requests["cpus"]) >= _int(conf, "spark.task.cpus", 1)


def session_conf(spark) -> dict[str, str]:
    """The running session's Spark conf, with its master."""
    sc = spark.sparkContext
    return {**dict(sc.getConf().getAll()), "spark.master": sc.master}


def engine_profile(spark, backend_spec: dict):
    """(the task resource profile of a stage running `backend_spec`'s engine or None, the engines the session
    runs at once): the engine's threads are the spec's (`torch_threads`), else one."""
    profile, slots, _ = engine_plan(spark, backend_spec)
    return profile, slots


def engine_plan(spark, backend_spec: dict):
    """(`engine_profile`'s two, whether Delta's jobs run beside the engines: `delta_beside`). Where they do,
    the plane queues a chunk job per engine and starts chunk jobs while a wave's plan lands; else a
    commit's jobs (and the plan's record) take the slot an engine would (docs/data_plane.md)."""
    conf = session_conf(spark)
    requests = engine_requests(conf, int(backend_spec.get("threads") or 1))
    executors = 0 if conf["spark.master"].startswith("local") else spark.sparkContext._jsc.sc().getExecutorIds().size()
    slots = engine_slots(conf, spark.sparkContext.defaultParallelism, requests, executors)
    beside = delta_beside(conf, requests)
    if requests is None:
        return None, slots, beside
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests
    task = TaskResourceRequests().cpus(int(requests["cpus"]))
    if "gpu" in requests:
        task = task.resource("gpu", requests["gpu"])
    return ResourceProfileBuilder().require(task).build, slots, beside
