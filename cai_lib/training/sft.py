"""SL-CAI supervised fine-tune: (prompt, response) rows -> a safetensors model folder.

A compact torch loop (AdamW, linear warmup/decay, gradient accumulation, grad clipping);
on CPU it is simpler and faster than TRL's SFTTrainer and every step is ours to test.

    from cai_lib.training.sft import SFTSettings, train_sft
    result = train_sft(model_dir, rows, SFTSettings(method="lora", max_steps=100), "out/sl")
    python -m pytest -q tests/test_sft.py cai_lib/training/sft.py

Choices (and why):
- Each row is rendered with the tokenizer's chat template as one user turn and one
  assistant turn. The prompt part is exactly the generation prompt the backends feed at
  inference, tokenized on its own; the response is tokenized after it, so the boundary is
  the same token boundary the model sees when it generates.
- The loss is on the response tokens only, up to and including the first end-of-turn
  (eos) token; the system prompt, user turn, assistant header, padding and whatever the
  template adds after the end-of-turn (a newline) have label -100.
- Too long: the prompt is kept whole and the response tail is cut (such a row loses its
  end-of-turn token, so the model is never taught to stop where the text was cut). A row
  whose prompt alone fills max_length, or whose response is empty, is not trained on and
  is returned in `dropped` with the reason: never silently skipped.
- Held-out rows are chosen by a stable hash of the row key, independent of the seed and
  of the other rows: the same prompt is held out in every run and every dataset version
  (for a given fraction), so before/after losses compare across runs without leakage.
- Weights are trained in `dtype` (float32 on CPU) and saved in the base folder's dtype by
  default; held-out loss "after" is measured on the weights exactly as saved. LoRA
  adapters are merged before saving, so the folder loads with plain AutoModelForCausalLM.
- Pickled weights (*.bin, *.pt, *.pth, *.pkl) are refused on the way in and checked for
  on the way out: loading a pickle can run code.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from cai_lib.backends.weights import DTYPE_NAMES, assert_no_pickles, torch_dtype
from cai_lib.config import check_fields, opt
from cai_lib.files import atomic_folder, write_json
from cai_lib.ids import split_heldout
from cai_lib.training.checkpoint import Checkpointer, check_checkpoint_fields, dir_field, every_field, fingerprint
from cai_lib.training.distributed import Ranks, rank_device, rank_seed, ranks
from cai_lib.training.policy import DEVICE_HELP, check_device_name, resolve_device
from cai_lib.training.sft_examples import IGNORE, Dropped, Example, build_examples, end_of_turn_ids

__all__ = ["SFTSettings", "SFTResult", "train_sft", "load_safetensors_folder", "SFT_SALT"]

# SFT rows are ingest's train prompts, already split by the unsalted hash of the same ids:
# the held-out split needs its own salt or it holds out nothing (see cai_lib.ids.is_heldout).
SFT_SALT = "sft-heldout:"

# ---------------------------------------------------------------- settings and results

@dataclass
class SFTSettings:
    method: str = opt("full", "full | lora (LoRA is merged before saving)", choices=("full", "lora"))
    learning_rate: float | None = opt(None, "peak learning rate; None = 1e-5 for full, 2e-4 for lora (LoRA needs a "
                                            "larger step)", gt=0.0, hi=1.0)
    epochs: float = opt(1.0, "passes over the train rows (when max_steps is None)", gt=0.0, hi=10_000.0)
    max_steps: int | None = opt(None, "optimizer steps; None = from epochs", lo=1)
    batch_size: int = opt(4, "rows per forward pass", lo=1, hi=4096)
    grad_accum: int = opt(1, "forward passes per optimizer step", lo=1, hi=4096)
    max_length: int = opt(512, "tokens per row (prompt + response)", lo=2, hi=131_072)
    warmup_steps: int = opt(0, "linear warmup, then linear decay to 0", lo=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", lo=0.0)
    max_grad_norm: float | None = opt(1.0, "clip; None = no clipping", gt=0.0)
    heldout_fraction: float = opt(0.1, "share of row keys held out (stable hash)", lo=0.0, lt=1.0)
    seed: int = opt(1234, "seeds the LoRA init and the data order (the held-out split is a hash of the row key)", lo=0)
    train_dtype: str = opt("float32", "training dtype; float32 on CPU", choices=DTYPE_NAMES)
    save_dtype: str = opt("auto", "auto = the base folder's dtype", choices=("auto", *DTYPE_NAMES))
    torch_threads: int | None = opt(None, "torch CPU threads; None = torch's default", lo=1, hi=1024)
    device: str | None = opt(None, "where the model trains: " + DEVICE_HELP)
    checkpoint_every: int = every_field()       # cai_lib.training.checkpoint: resume a killed run
    checkpoint_dir: str | None = dir_field()
    lora_r: int = opt(16, "LoRA rank", lo=1, hi=4096)
    lora_alpha: int = opt(32, "LoRA scale numerator (the update is scaled by alpha / r)", gt=0)
    lora_dropout: float = opt(0.05, "dropout on the LoRA input", lo=0.0, lt=1.0)
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata={
        "help": "LoRA targets; default the attention projections of Llama-style models"})

    def __post_init__(self):
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", 1e-5 if self.method == "full" else 2e-4)
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        check_fields(self)   # the bounds above, for settings built in code as for params and flags
        check_device_name(self.device, "SFTSettings.device")
        check_checkpoint_fields(self)
        if self.method == "lora" and not self.target_modules:
            raise ValueError("SFTSettings.target_modules is empty: name the modules LoRA adapts "
                             "(e.g. q_proj, k_proj, v_proj, o_proj)")


@dataclass
class SFTResult:
    out_dir: Path
    method: str
    n_train: int
    n_heldout: int
    n_truncated: int
    dropped: list[Dropped]
    heldout_loss_before: float | None   # None when no row is held out
    heldout_loss_after: float | None
    train_losses: list[float]           # one per optimizer step (token-weighted mean)
    steps: int
    seconds: float                      # the whole call: load, evaluate, train, save
    train_seconds: float                # the optimizer steps only
    changed_params: int                 # parameter tensors that differ from the base, as saved
    total_params: int                   # parameter tensors in the model
    heldout_keys: list[str]
    resumed_from_step: int = 0          # the checkpoint's step this run continued from (0 = a fresh start)


# ---------------------------------------------------------------- safetensors only

def load_safetensors_folder(folder: Path | str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local HF folder, after refusing pickles; safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = Path(folder)
    assert_no_pickles(folder)
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"model folder {folder} has no *.safetensors weights: pass a Hugging Face "
                         "model folder saved with safetensors (resolve ids with resolve_model)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


# ---------------------------------------------------------------- training

def _batches(examples: Sequence[Example], size: int, pad_id: int, device) -> Iterable[dict]:
    """Right-padded tensors, `size` examples at a time (padding: attention 0, label IGNORE)."""
    for i in range(0, len(examples), size):
        chunk = examples[i:i + size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[r, :len(e.labels)] = torch.tensor(e.labels)
            mask[r, :len(e.input_ids)] = 1
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    target = batch["labels"][:, 1:]                      # logits[:, t] predict token t + 1
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                             target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


@torch.no_grad()
def _heldout_loss(model, examples: Sequence[Example], batch_size: int, pad_id: int, device,
                  group: Ranks = Ranks()) -> float | None:
    """Token-weighted mean loss over the held-out response tokens (eval mode, no dropout); each
    rank scores its share of the rows and the sums are added up."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(group.shard(examples), batch_size, pad_id, device):
        loss, n = _loss_sum(model, batch)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    total, count = group.sum_(total, count)
    return total / count


def _step_groups(n: int, settings: SFTSettings, generator: torch.Generator) -> Iterable[list[int]]:
    """Row indices per optimizer step: a fresh seeded shuffle each epoch, cut in groups of
    batch_size * grad_accum (the last group of an epoch may be smaller)."""
    per_step = settings.batch_size * settings.grad_accum
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n, per_step):
            yield order[i:i + per_step]


def _lr_at(step: int, total: int, settings: SFTSettings) -> float:
    """Linear warmup over warmup_steps, then linear decay towards 0 at `total` (step is 0-based)."""
    peak = settings.learning_rate
    if step < settings.warmup_steps:
        return peak * (step + 1) / settings.warmup_steps
    span = max(1, total - settings.warmup_steps)
    return peak * (1 - (step - settings.warmup_steps) / span)


def _digests(model, dtype: torch.dtype) -> dict[str, str]:
    """blake2b of each parameter tensor as it would be saved in `dtype` (cheap on memory)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach().to("cpu", dtype).contiguous()
        raw = t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)
        out[name] = hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()
    return out


def _base_dtype(folder: Path) -> torch.dtype:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype")
    return torch_dtype(name) if name in DTYPE_NAMES else torch.float32


def train_sft(model_dir: Path | str, rows: Iterable[Mapping], settings: SFTSettings,
              out_dir: Path | str,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> SFTResult:
    """Fine-tune the model in `model_dir` on `rows` and save it to `out_dir` (safetensors).

    on_step(step, {"loss", "lr", "grad_norm"}) is called after every optimizer step (1-based)."""
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir {model_dir} is not a Hugging Face model folder (no config.json); "
                         "resolve model ids to folders with cai_lib.backends.models.resolve_model")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir {out_dir} exists and is not empty: choose a new folder or delete it")
    assert_no_pickles(model_dir)
    device = resolve_device(settings.device)   # `device cuda` without a GPU fails here, before any load
    if device.type == "cpu" and settings.train_dtype == "float16":
        raise ValueError("SFTSettings.dtype float16 is not supported on CPU: use float32")
    save_dtype = _base_dtype(model_dir) if settings.save_dtype == "auto" else torch_dtype(settings.save_dtype)

    old_threads = torch.get_num_threads()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seed locally; the caller's RNG state is restored
            torch.manual_seed(settings.seed)
            result = _train(model_dir, list(rows), settings, out_dir, on_step, device, save_dtype)
    finally:
        torch.set_num_threads(old_threads)
    result.seconds = time.perf_counter() - start
    return result


def _train(model_dir, rows, settings, out_dir, on_step, device, save_dtype) -> SFTResult:
    group = ranks()   # one process, or this rank of a TorchDistributor run (cai_lib.training.distributed)
    device = rank_device(device)
    model, tokenizer = load_safetensors_folder(model_dir, torch_dtype(settings.train_dtype))
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_of_turn_ids(tokenizer) or {0})

    examples, dropped = build_examples(tokenizer, rows, settings.max_length)
    train, heldout = split_heldout(examples, settings.heldout_fraction, key=lambda e: e.key, salt=SFT_SALT)
    if not train:
        raise ValueError(f"no training rows left ({len(rows)} rows, {len(dropped)} dropped, "
                         f"{len(heldout)} held out): pass more rows or a smaller heldout_fraction")
    base = _digests(model, save_dtype) if group.main else {}
    loss_before = _heldout_loss(model, heldout, settings.batch_size, pad_id, device, group)

    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
            target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    group.broadcast_(params)   # every rank starts from rank 0's weights (the LoRA init too)
    if group.world > 1:
        torch.manual_seed(rank_seed(settings.seed, group))   # dropout differs per rank; the schedule does not
    # a checkpoint continues only the run that wrote it: same settings, rows, base weights and ranks
    fp = fingerprint("sft", settings, rows, model_dir, group.world) if settings.checkpoint_every else {}
    t0 = time.perf_counter()
    losses, resumed = _fit(model, train, settings, pad_id, device, on_step, group, Checkpointer(settings, fp, group))
    train_seconds = time.perf_counter() - t0

    if settings.method == "lora":
        model = model.merge_and_unload()
    # Measure "after" on the weights exactly as they will be saved (rounded to save_dtype).
    model.to(save_dtype).to(torch_dtype(settings.train_dtype))
    loss_after = _heldout_loss(model, heldout, settings.batch_size, pad_id, device, group)
    result = SFTResult(
        out_dir=out_dir, method=settings.method, n_train=len(train), n_heldout=len(heldout),
        n_truncated=sum(e.truncated for e in examples), dropped=dropped,
        heldout_loss_before=loss_before, heldout_loss_after=loss_after, train_losses=losses,
        steps=len(losses), seconds=0.0, train_seconds=train_seconds, changed_params=0,
        total_params=0, heldout_keys=[e.key for e in heldout], resumed_from_step=resumed)
    if group.main:   # one writer: rank 0 saves; the others' weights are the same
        _save(model, tokenizer, model_dir, out_dir, settings, save_dtype, base, result)
    return result


def _fit(model, train, settings, pad_id, device, on_step, group: Ranks,
         ckpt: Checkpointer) -> tuple[list[float], int]:
    """The optimizer steps: (the loss of each, the step resumed from). Every rank draws the same
    global step groups and trains on its share, the loss normalised by the whole step's token
    count, the gradients summed over ranks: N ranks take the step one process would. With
    checkpoints on, a run starts from the latest one (weights, optimizer, RNGs, the data order
    drawn up to its step) and writes one every checkpoint_every steps."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    # fused AdamW: one kernel over all tensors; on 2 CPU cores ~5x faster than foreach for 135M.
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    per_step = settings.batch_size * settings.grad_accum
    total = settings.max_steps or max(1, math.ceil(settings.epochs * math.ceil(len(train) / per_step)))
    per_rank = math.ceil(settings.batch_size / group.world)   # the same global batch, split N ways
    model.train()
    generator = torch.Generator().manual_seed(settings.seed)
    resume = ckpt.restore(named, optimizer)
    losses = list(resume.history)
    groups = itertools.islice(_step_groups(len(train), settings, generator), resume.step, None)   # replay the order
    for step, group_rows in zip(range(resume.step, total), groups):
        lr = _lr_at(step, total, settings)
        for g in optimizer.param_groups:
            g["lr"] = lr
        chunk = [train[i] for i in group.shard(group_rows)]
        n_tokens = sum(_n_labelled(train[i]) for i in group_rows)
        step_loss = 0.0
        for batch in _batches(chunk, per_rank, pad_id, device):
            loss, _ = _loss_sum(model, batch)
            (loss / n_tokens).backward()   # token-weighted mean over the whole optimizer step
            step_loss += loss.item()
        group.sum_grads_(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, settings.max_grad_norm if settings.max_grad_norm else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(group.sum_(step_loss)[0] / n_tokens)
        if on_step is not None and group.main:
            on_step(step + 1, {"loss": losses[-1], "lr": lr, "grad_norm": float(grad_norm)})
        ckpt.save(step + 1, named, optimizer, losses, {"step_groups_drawn": step + 1, "seed": settings.seed})
    return losses, resume.step


def _n_labelled(e: Example) -> int:
    return sum(1 for t in e.labels[1:] if t != IGNORE)


def _save(model, tokenizer, model_dir, out_dir, settings, save_dtype, base, result: SFTResult) -> None:
    """Digest the trained weights against the base, then write the folder all or nothing."""
    after = _digests(model, save_dtype)
    result.changed_params = sum(1 for name, d in after.items() if base.get(name) != d)
    result.total_params = len(after)
    model.to("cpu", save_dtype)
    with atomic_folder(out_dir) as tmp:   # out_dir is absent or empty (checked above)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "cai_sft.json", {
            "base_model": str(model_dir), "settings": asdict(settings), "steps": result.steps,
            "train_losses": result.train_losses, "heldout_loss_before": result.heldout_loss_before,
            "heldout_loss_after": result.heldout_loss_after, "n_train": result.n_train,
            "heldout_keys": result.heldout_keys, "dropped": [asdict(d) for d in result.dropped]})
        assert_no_pickles(tmp)
