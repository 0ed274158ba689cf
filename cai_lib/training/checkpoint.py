"""Step checkpoints: a killed training resumes where its last checkpoint left it, to the same weights.

    settings = SFTSettings(max_steps=500, checkpoint_every=50, checkpoint_dir="checkpoints/sl")
    train_sft(model_dir, rows, settings, out_dir)   # killed at step 180 ...
    train_sft(model_dir, rows, settings, out_dir)   # ... the same call again resumes from step 150
    python -m pytest -q tests/test_training_checkpoint.py

A checkpoint is the folder `<checkpoint_dir>/step-00000150/` holding
- `state.safetensors`: the trainable tensors (all weights for a full fine-tune, PPO or DPO, the LoRA
  adapter, the PM's head and, when it trains, its backbone, PPO's value head) and the optimizer's
  tensors (AdamW's moments and step counts);
- `checkpoint.json`: the step, the per-step history so far (losses; PPO's and DPO's metric dicts), the
  optimizer's hyper-parameters, each rank's torch (CPU, and CUDA where used), Python and NumPy RNG
  states, the data-order position (with PPO's KL coefficient and minibatch-order generator), and
  the run's fingerprint (the settings that shape the result, a digest of the rows and of the base
  model's files, PPO's reward model's too, the number of ranks).
No pickle anywhere: loading a checkpoint runs no code (the project's rule for weights).
SFT's learning rate is a function of the step (sft.py's `_lr_at`), so the step is its LR schedule's
whole state; the PM, PPO and DPO keep constant rates (restored with the optimizer's parameter groups). The data order is a pure function of the seed (a seeded shuffle per epoch, cut into
steps): the position is the number of step groups drawn, and a resume draws them again (a randperm
per epoch, microseconds) rather than storing the permutation.

Written atomically by rank 0 alone: into `.step-N.tmp`, renamed to `step-N` once complete, and only
then are older steps removed, so a kill at any moment leaves the last complete checkpoint in place
(a leftover `.tmp` is never read, and is cleared by the next write). The ranks' RNG states reach rank 0
through one all-gather, so every rank must call `save` at the same steps (they do: same schedule).
A checkpoint whose fingerprint differs from the run's (other settings, rows, base model or number of
ranks) is refused with CheckpointMismatch naming the folder, what differs and the fix; it is never
silently used, nor silently discarded. `checkpoint_every` and `checkpoint_dir` themselves, the device
and torch_threads are not part of the fingerprint: they change where and how often, not what is trained.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cai_lib.config import opt
from cai_lib.training.distributed import Ranks

__all__ = ["CheckpointMismatch", "Checkpointer", "Resume", "every_field", "dir_field", "check_checkpoint_fields",
           "fingerprint", "latest_checkpoint", "clear_checkpoints"]

STATE, META = "state.safetensors", "checkpoint.json"
FORMAT = 1
# settings that change where or how often, not what is trained: a resume may change them
NOT_FINGERPRINTED = ("checkpoint_every", "checkpoint_dir", "device", "torch_threads")


def every_field():
    return opt(0, "write a resumable checkpoint every this many optimizer steps into checkpoint_dir (0 = off); "
                  "the same command after a kill resumes from the last one", lo=0)


def dir_field():
    return opt(None, "folder of the step checkpoints (needed when checkpoint_every > 0; every rank must see it). "
                     "It must belong to this run: a checkpoint of other settings or data is refused")


def check_checkpoint_fields(settings) -> None:
    name = type(settings).__name__
    if settings.checkpoint_every and not (settings.checkpoint_dir or "").strip():
        raise ValueError(f"{name}.checkpoint_every is {settings.checkpoint_every} but checkpoint_dir is not set: "
                         "name a folder for the checkpoints (--checkpoint-dir), or set checkpoint_every 0")


class CheckpointMismatch(ValueError):
    """A checkpoint of another run (settings, rows, base model or ranks) sits in checkpoint_dir."""


# ---------------------------------------------------------------- what makes a run the same run

def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _model_digest(model_dir) -> str:
    """sha256 of the base model's config and weight files (a registered model is fetched to a new
    temp folder each run, so its path says nothing); a hub id that is no folder: the id itself."""
    from cai_lib.backends.models import resolve_model
    folder = resolve_model(str(model_dir))
    if not (isinstance(folder, Path) and folder.is_dir()):
        return f"id:{folder}"
    return _sha256_files(sorted([*folder.glob("*.safetensors"), *folder.glob("config.json")]))


def fingerprint(kind: str, settings, rows: Sequence, model_dir, world: int, **models) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run (JSON-normalised, for comparison);
    `models` names other model folders the run depends on (PPO's reward model), digested alike."""
    shaped = {k: v for k, v in asdict(settings).items() if k not in NOT_FINGERPRINTED}
    data = hashlib.sha256(json.dumps(list(rows), sort_keys=True, default=str).encode()).hexdigest()
    others = {f"{name}_sha256": _model_digest(folder) for name, folder in models.items()}
    return json.loads(json.dumps({"kind": kind, "settings": shaped, "rows_sha256": data, "n_rows": len(rows),
                                  "base_model_sha256": _model_digest(model_dir), "ranks": world, **others}))


def _differences(saved: Mapping, current: Mapping) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key} {a!r} -> {b!r}" if key in ("kind", "ranks", "n_rows") else f"{key} differs")
    return out


# ---------------------------------------------------------------- the folder

def _step_of(p: Path) -> int | None:
    name = p.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() and (p / META).is_file() else None


def latest_checkpoint(folder: str | Path | None) -> Path | None:
    """The complete checkpoint of the highest step in `folder` (None: none, or no folder)."""
    if not folder or not Path(folder).is_dir():
        return None
    done = [(s, p) for p in Path(folder).iterdir() if (s := _step_of(p)) is not None]
    return max(done)[1] if done else None


def clear_checkpoints(folder: str | Path | None) -> int:
    """Remove this module's checkpoints (and leftover temp folders) from `folder`, then the folder if
    empty: the jobs call it once the model is registered. Returns how many were removed."""
    if not folder or not Path(folder).is_dir():
        return 0
    mine = [p for p in Path(folder).iterdir() if p.is_dir() and (p.name.startswith("step-")
                                                                or (p.name.startswith(".step-") and p.name.endswith(".tmp")))]
    for p in mine:
        shutil.rmtree(p)
    if not any(Path(folder).iterdir()):
        Path(folder).rmdir()
    return len(mine)


# ---------------------------------------------------------------- RNG states

def _rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (CPU and CUDA) as byte lists, Python's and NumPy's as JSON."""
    state: dict[str, Any] = {"torch": torch.get_rng_state().tolist(), "python": _jsonable(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
    except ImportError:   # numpy is not a dependency of the loops; its state is kept when it is there
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_tupled(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (list, tuple)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _gather_rng(group: Ranks) -> list[dict]:
    """Every rank's RNG states, in rank order (one all-gather; a single process: its own)."""
    mine = _rng_state()
    if group.world == 1:
        return [mine]
    out: list = [None] * group.world
    torch.distributed.all_gather_object(out, mine)
    return out


# ---------------------------------------------------------------- save and restore

@dataclass
class Resume:
    """Where a run starts: step 0 and no history, or a checkpoint's step and the per-step history
    (losses, or metric dicts) up to it."""
    step: int = 0
    history: tuple = ()
    path: Path | None = None
    position: dict = field(default_factory=dict)   # what save() was given as the data position (and loop state)


class Checkpointer:
    """Save and restore one run's step checkpoints. `params` are the named trainable tensors."""

    def __init__(self, settings, fp: Mapping[str, Any], group: Ranks):
        self.every = int(settings.checkpoint_every or 0)
        self.folder = Path(settings.checkpoint_dir) if self.every else None
        self.fp, self.group = dict(fp), group

    def restore(self, params: Mapping[str, torch.Tensor], optimizer) -> Resume:
        """Load the latest checkpoint into params, optimizer and this rank's RNGs; Resume() if none."""
        path = latest_checkpoint(self.folder) if self.every else None
        if path is None:
            return Resume()
        meta = json.loads((path / META).read_text())
        diff = _differences(meta.get("fingerprint", {}), self.fp) if meta.get("format") == FORMAT else ["format"]
        if diff:
            raise CheckpointMismatch(
                f"checkpoint {path} was written by another run ({'; '.join(diff)}): it cannot continue this one. "
                f"Fix: pass a fresh --checkpoint-dir for this run, or delete {self.folder} to start over")
        from safetensors.torch import load_file
        tensors = load_file(str(path / STATE))
        saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
        if saved != set(params):
            raise CheckpointMismatch(f"checkpoint {path} holds other trainable tensors than this run "
                                     f"({len(saved)} vs {len(params)}). Fix: delete {self.folder} to start over")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[f"param.{name}"])
        optimizer.load_state_dict(_optimizer_state(meta["optimizer"], tensors))
        _set_rng_state(meta["rng"][self.group.rank])
        return Resume(int(meta["step"]), tuple(meta["history"]), path, dict(meta["data_position"]))

    def save(self, step: int, params: Mapping[str, torch.Tensor], optimizer, history: Sequence,
             position: Mapping[str, Any]) -> Path | None:
        """At every `every`-th step: rank 0 writes the checkpoint (all ranks must call this)."""
        if not self.every or step % self.every:
            return None
        rng = _gather_rng(self.group)
        if not self.group.main:
            return None
        from safetensors.torch import save_file
        tensors = {f"param.{k}": v.detach().to("cpu").contiguous().clone() for k, v in params.items()}
        opt_meta, opt_tensors = _split_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        final = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".step-{step:08d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)   # a killed earlier write
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / STATE))
        (tmp / META).write_text(json.dumps({
            "format": FORMAT, "step": step, "history": list(history), "optimizer": opt_meta, "rng": rng,
            "data_position": dict(position), "fingerprint": self.fp}, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)   # the same step written again (a resumed run that was killed before it)
        tmp.rename(final)          # the checkpoint exists complete or not at all
        for p in self.folder.iterdir():   # only then drop the older ones
            if p != final and p.name.startswith(("step-", ".step-")):
                shutil.rmtree(p, ignore_errors=True)
        return final


def _split_optimizer(sd: Mapping) -> tuple[dict, dict[str, torch.Tensor]]:
    """An optimizer state_dict as (JSON part, tensors keyed optim.<param index>.<name>)."""
    tensors, state = {}, {}
    for idx, entry in sd["state"].items():
        state[str(idx)] = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                state[str(idx)][k] = v
    return {"param_groups": _jsonable_groups(sd["param_groups"]), "state": state}, tensors


def _jsonable_groups(groups: Sequence[Mapping]) -> list[dict]:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]


def _optimizer_state(meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
