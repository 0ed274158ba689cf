"""What a registered model does when MLflow loads it: policies answer, the PM scores.

`mlflow.pyfunc.load_model("models:/cai-rl@champion")`, `mlflow models serve` and Databricks
Model Serving all end here (through `pyfunc_model.py`, a model from code):

  Policy        cai-sl / cai-rl: prompts or chat messages -> the model's responses, rendered
                with the checkpoint's own chat template (TransformersBackend, as sl-generate
                and evaluate answer), sampled with the request's `params`
  RewardModel   cai-pm: (prompt, response) rows -> the reward, `PreferenceModel.score_pairs`:
                the number `cai evaluate` and PPO use
  load_servable the one loader: refuses pickle weights and weights whose sha256 is not the one
                recorded at registration (the artifact served is the one the lineage names)

Inputs (a pandas DataFrame as MLflow's /invocations builds it, a list or a dict): a `prompt`
column of strings, or a `messages` column of chats ([{"role", "content"}, ...]); a row
with neither is an error naming the row. A generation that fails raises: nothing is dropped.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cai_lib.backends.base import Sampling
from cai_lib.backends.models import FINGERPRINT_CACHE, hash_file_into

# a request's generation params: the jobs' Sampling defaults, and the first row's seed
GENERATION_PARAMS = {**{k: getattr(Sampling(), k) for k in ("max_new_tokens", "temperature", "top_p")}, "seed": 0}
POLICY_KINDS, PM_KINDS = ("sl", "rl"), ("pm",)


def weights_sha256(folder: str | Path) -> str:
    """sha256 over every file of a weights folder (relative path and bytes, in path order), the
    cache file of `fingerprint` aside. Never cached: this is what a load checks."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.name != FINGERPRINT_CACHE):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        hash_file_into(h, p)
    return h.hexdigest()


HOW = ("send a DataFrame with one row per request, e.g. pd.DataFrame({'prompt': [...]}), or over REST "
       "{\"dataframe_records\": [{\"prompt\": \"...\"}]}")


def _rows(model_input) -> list[dict]:
    """Records from a DataFrame (what MLflow hands a model with a signature), a list of strings or
    dicts, or a dict of columns. An input with no rows is an error: MLflow turns a bare list of
    strings into an empty frame, and answering [] to it would drop every request silently."""
    if hasattr(model_input, "to_dict"):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, str):
        rows = [{"prompt": model_input}]
    elif isinstance(model_input, dict):
        cols = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in model_input.items()}
        n = {len(v) for v in cols.values()}
        if len(n) > 1:
            raise ValueError(f"input columns have different lengths: { {k: len(v) for k, v in cols.items()} }")
        rows = [{k: v[i] for k, v in cols.items()} for i in range(n.pop() if n else 0)]
    elif isinstance(model_input, (list, tuple)):
        rows = [r if isinstance(r, dict) else {"prompt": r} for r in model_input]
    else:
        raise ValueError(f"unsupported input {type(model_input).__name__}: {HOW}")
    if not rows:
        raise ValueError(f"the input has no rows (a bare list of strings reaches the model as an empty frame): {HOW}")
    return rows


def _present(value) -> bool:
    if value is None:
        return False
    try:
        return len(value) > 0
    except TypeError:                       # float NaN of a missing pandas cell
        return False


def to_chats(model_input) -> list[list[dict[str, str]]]:
    """One chat per row: its `messages`, else its `prompt` as the user's turn.

    >>> to_chats({"prompt": ["Hi", "Bye"]})
    [[{'role': 'user', 'content': 'Hi'}], [{'role': 'user', 'content': 'Bye'}]]
    >>> to_chats([{"messages": [{"role": "user", "content": "Hi"}]}])
    [[{'role': 'user', 'content': 'Hi'}]]
    >>> to_chats([{"prompt": ""}])
    Traceback (most recent call last):
    ValueError: row 0 has neither a non-empty `prompt` nor `messages`; send one of them
    """
    chats = []
    for i, row in enumerate(_rows(model_input)):
        if _present(row.get("messages")):
            chat = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
        elif isinstance(row.get("prompt"), str) and row["prompt"]:
            chat = [{"role": "user", "content": row["prompt"]}]
        elif _present(row.get("prompt")) and not isinstance(row["prompt"], str):
            raise ValueError(f"row {i}: `prompt` must be one string, got {type(row['prompt']).__name__}: {HOW}")
        else:
            raise ValueError(f"row {i} has neither a non-empty `prompt` nor `messages`; send one of them")
        chats.append(chat)
    return chats


def generation_params(params: dict | None):
    """(Sampling, first seed) from a request's params, defaults from GENERATION_PARAMS.

    >>> generation_params({"temperature": 0, "max_new_tokens": 8})
    (Sampling(temperature=0.0, top_p=0.9, max_new_tokens=8, stop=()), 0)
    """
    unknown = set(params or {}) - set(GENERATION_PARAMS)
    if unknown:
        raise ValueError(f"unknown params {sorted(unknown)}; a policy takes {sorted(GENERATION_PARAMS)}")
    p = {**GENERATION_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    return Sampling(temperature=float(p["temperature"]), top_p=float(p["top_p"]),
                    max_new_tokens=int(p["max_new_tokens"])), int(p["seed"])


class Policy:
    def __init__(self, folder: Path):
        from cai_lib.backends.transformers_backend import TransformersBackend
        self.backend = TransformersBackend(str(folder))

    def predict(self, model_input, params: dict | None = None) -> list[str]:
        chats = to_chats(model_input)
        sampling, seed = generation_params(params)
        out = self.backend.generate(chats, sampling, [seed + i for i in range(len(chats))])
        failed = [(i, g.error) for i, g in enumerate(out) if g.text is None]
        if failed:
            raise ValueError(f"{len(failed)} of {len(chats)} generations failed; row {failed[0][0]}: {failed[0][1]}")
        return [g.text for g in out]


class RewardModel:
    def __init__(self, folder: Path):
        from cai_lib.training.pm_model import PreferenceModel
        self.pm = PreferenceModel.load(folder)
        self.pm.eval()

    def predict(self, model_input, params: dict | None = None) -> list[float]:
        if params:
            raise ValueError(f"a reward model takes no params, got {sorted(params)}")
        rows = _rows(model_input)
        for i, r in enumerate(rows):
            if not (isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str)):
                raise ValueError(f"row {i} needs string `prompt` and `response` columns, got {sorted(r)}")
        import torch
        with torch.no_grad():
            return self.pm.score_pairs([r["prompt"] for r in rows], [r["response"] for r in rows]).tolist()


def load_servable(folder: str | Path, config: dict[str, Any]):
    """The Policy or RewardModel of a registered weights folder, after the safety checks."""
    from cai_lib.backends.weights import assert_no_pickles
    folder = Path(folder)
    assert_no_pickles(folder)
    want = config.get("weights_sha256")
    if want is None:
        raise ValueError(f"{folder}: the model config records no weights_sha256; register it again with "
                         "cai_lib.registry.models.register_folder")
    got = weights_sha256(folder)
    if got != want:
        raise ValueError(f"{folder}: weights sha256 {got[:12]} is not the registered {want[:12]}: "
                         "the artifact changed after registration; refusing to serve it")
    kind = config.get("kind")
    if kind in POLICY_KINDS:
        return Policy(folder)
    if kind in PM_KINDS:
        return RewardModel(folder)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {POLICY_KINDS + PM_KINDS}")
