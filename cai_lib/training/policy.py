"""What PPO and DPO share: their settings, the policy loaded from safetensors, the optimizer
step, chat rendering and the all-or-nothing save. The trainers are `cai_lib.training.ppo` and
`cai_lib.training.dpo`; the PPO formulas are `cai_lib.training.ppo_math`.

Both trainers save the policy alone (no value head) as a float32 safetensors folder with the
tokenizer (bf16 would round away most updates of size ~lr), all or nothing.

`resolve_device` is here too: the one reading of a `device` option for every model-running
step (SFT, PM training, PPO, DPO, the RL reward PM, evaluate's PM), so `--device` means the
same everywhere and `--device cuda` without a GPU fails at once, saying so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from cai_lib.backends.weights import assert_no_pickles, dtype_name
from cai_lib.config import check_fields, opt
from cai_lib.files import atomic_folder
from cai_lib.training.checkpoint import check_checkpoint_fields, dir_field, every_field
from cai_lib.training.distributed import Ranks, rank_device

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
OnStep = Callable[[int, dict], None]

POLICY_DTYPE = torch.float32   # the RL policy, its reference and the value head compute (and save) in this
DEVICE_HELP = "cpu | cuda | cuda:N | auto; None/auto = cuda when torch.cuda.is_available(), else cpu"
_DEVICE_FIX = "Fix: pass cpu, cuda, cuda:N or auto"


# ---------------------------------------------------------------- devices

def check_device_name(asked, where: str = "device") -> None:
    """Refuse a device string torch cannot parse or this project does not run on. Settings call
    it in __post_init__, so a typo fails when the config is read, not after the data load.

    >>> check_device_name("cuda:1"); check_device_name(None); check_device_name("auto")
    >>> check_device_name("gpu")
    Traceback (most recent call last):
    ValueError: device 'gpu' is not a device this project runs on. Fix: pass cpu, cuda, cuda:N or auto
    """
    if asked is None or asked == "auto":
        return
    if not isinstance(asked, str):
        raise ValueError(f"{where} must be a str or None, got {type(asked).__name__}. {_DEVICE_FIX}")
    try:
        kind = torch.device(asked).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"{where} {asked!r} is not a device this project runs on. {_DEVICE_FIX}")


def resolve_device(asked: str | None) -> torch.device:
    """The torch.device of a `device` option: None/"auto" = cuda if available, else cpu. An
    explicit cuda device must exist: a ValueError naming the fix, not hours of silent CPU training.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    check_device_name(asked)
    if asked is None or asked == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(asked)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {asked} was asked for but torch.cuda.is_available() is False; Fix: run on "
                             "a machine with a CUDA GPU and a CUDA build of torch (docs/clusters.md), or pass "
                             "--device cpu (or leave device unset: auto picks the CPU here)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {asked} was asked for but torch sees {count} CUDA device(s); Fix: pass "
                             f"cuda:0..cuda:{count - 1} or check CUDA_VISIBLE_DEVICES")
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (its first parameter's device): for tags and checks."""
    return next(module.parameters()).device


def module_dtype(module: torch.nn.Module) -> str:
    """The dtype name ('float32', 'bfloat16') a module's weights compute in: for MLflow tags."""
    return dtype_name(next(module.parameters()).dtype)


@dataclass
class RLSettings:
    algorithm: str = opt("ppo", "ppo (online, against reward_fn = the PM) | dpo (offline, on preference pairs)",
                         choices=("ppo", "dpo"))
    steps: int = opt(100, "PPO iterations: one rollout of batch_size prompts each", lo=1)
    batch_size: int = opt(16, "PPO: prompts per iteration; DPO: pairs per optimizer step", lo=1, hi=4096)
    ppo_epochs: int = opt(4, "passes of minibatch updates over each rollout (Schulman et al. use a few)", lo=1, hi=100)
    mini_batch_size: int = opt(4, "rows per forward/backward: PPO minibatch, DPO gradient-accumulation chunk",
                               lo=1, hi=4096)
    max_new_tokens: int = opt(128, "PPO: response length cap in tokens (the EOS counts)", lo=1, hi=32768)
    max_prompt_tokens: int = opt(512, "PPO: prompts longer than this once rendered are dropped (and counted)",
                                 lo=1, hi=131_072)
    temperature: float = opt(1.0, "PPO sampling temperature; log-probs use the same logits / temperature",
                             gt=0.0, hi=10.0)
    top_p: float = opt(1.0, "PPO nucleus sampling; 1.0 samples the full distribution (exactly on-policy)",
                       gt=0.0, hi=1.0)
    learning_rate: float = opt(1e-5, "AdamW learning rate (no weight decay: it would pull away from SL-CAI)",
                               gt=0.0, hi=1.0)
    max_grad_norm: float | None = opt(1.0, "clip the gradient norm per update; None = no clipping", gt=0.0)
    clip_range: float = opt(0.2, "PPO ratio clip epsilon", gt=0.0)
    clip_range_value: float | None = opt(0.2, "PPO value clip; None = no value clipping", gt=0.0)
    vf_coef: float = opt(0.1, "weight of the value loss", lo=0.0)
    gamma: float = opt(1.0, "discount; 1.0 as the PM scores the whole response once", lo=0.0, hi=1.0)
    lam: float = opt(0.95, "GAE lambda", lo=0.0, hi=1.0)
    kl_beta: float = opt(0.05, "KL penalty coefficient to the SL-CAI reference (initial value if adaptive)", lo=0.0)
    kl_mode: str = opt("fixed", "fixed | adaptive (Ziegler et al. 2019: steer the KL toward kl_target)",
                       choices=("fixed", "adaptive"))
    kl_target: float = opt(6.0, "adaptive: target sequence KL in nats", gt=0.0)
    kl_horizon: float = opt(10000.0, "adaptive: horizon in samples", gt=0.0)
    whiten_advantages: bool = opt(True, "normalise advantages per rollout: step size independent of the PM scale")
    seed: int = opt(1234, "seeds the value head, prompt order, sampling and minibatch order", lo=0)
    torch_threads: int | None = opt(None, "torch intra-op threads for the process; None = leave as is. On a "
                               "busy machine 1 is far faster than 2 (threads spin at barriers)", lo=1, hi=1024)
    dpo_beta: float = opt(0.1, "DPO temperature beta: larger = stay closer to the reference", gt=0.0)
    dpo_epochs: int = opt(1, "DPO passes over the pairs", lo=1, hi=10_000)
    dpo_max_steps: int | None = opt(None, "DPO: stop after this many optimizer steps; None = all epochs", lo=1)
    max_length: int = opt(1024, "DPO: prompt + response tokens; longer pairs lose response tokens first "
                                "(at least 2: one prompt and one response token)", lo=2, hi=131_072)
    device: str | None = opt(None, "where the policy, the reference and the value head run: " + DEVICE_HELP)
    checkpoint_every: int = every_field()       # cai_lib.training.checkpoint: resume a killed PPO or DPO run
    checkpoint_dir: str | None = dir_field()

    def __post_init__(self):
        check_fields(self)   # the bounds above, for settings built in code as for params and flags
        check_checkpoint_fields(self)
        if self.mini_batch_size > self.batch_size:
            raise ValueError(f"RLSettings.mini_batch_size must be <= batch_size ({self.batch_size}), "
                             f"got {self.mini_batch_size}")
        check_device_name(self.device, "RLSettings.device")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class RLResult:
    algorithm: str
    out_dir: Path
    metrics: list[dict] = field(default_factory=list)   # one dict per step, as passed to on_step
    seconds: float = 0.0
    prompts_dropped: int = 0                             # PPO: over max_prompt_tokens
    pairs_truncated: int = 0                             # DPO: cut to max_length
    device: str = ""                                     # where the policy (and reference, value head) ran
    resumed_from_step: int = 0                           # the checkpoint's step it continued from (0 = fresh)



def check_settings(settings, algorithm: str) -> RLSettings:
    if not isinstance(settings, RLSettings):
        raise TypeError(f"settings must be an RLSettings, got {type(settings).__name__}")
    if settings.algorithm != algorithm:
        raise ValueError(f"settings.algorithm is {settings.algorithm!r} but train_{algorithm} was called; "
                         f"set algorithm={algorithm!r} or call train_{settings.algorithm}")
    return settings


def load_policy(policy_dir, settings: RLSettings, algorithm: str):
    """Tokenizer and float32 policy (eval mode, on settings.device) from a model folder or
    'default'; seeds torch. The device is resolved first: `device cuda` without a GPU fails
    before the weights are read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai_lib.backends.models import resolve_model

    check_settings(settings, algorithm)
    device = rank_device(resolve_device(settings.device))   # one GPU per rank when data-parallel
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    torch.manual_seed(settings.seed)
    folder = resolve_model(str(policy_dir))
    assert_no_pickles(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {folder} has no eos_token: RL needs one to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=POLICY_DTYPE, use_safetensors=True).to(device)
    policy.eval()  # no dropout: old, new and reference log-probs come from the same function
    return tokenizer, policy


def make_optimizer(params, settings: RLSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=settings.learning_rate, weight_decay=0.0)


def step_update(optimizer, params, loss: Tensor, settings: RLSettings, group: Ranks = Ranks()) -> None:
    """Backward, average the gradients over the data-parallel ranks (each rank's loss is a mean
    over its equal share of the minibatch), clip, step."""
    loss.backward()
    group.sum_grads_(params)
    if group.world > 1:
        for p in params:
            p.grad.div_(group.world)
    if settings.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def save_policy(policy, tokenizer, out_dir) -> Path:
    """The policy (float32, safetensors) + tokenizer; written next to out_dir, then renamed."""
    out = Path(out_dir).resolve()
    with atomic_folder(out) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not list(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no safetensors file to {tmp}")
    return out


def render_chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def text_list(xs, name: str) -> list[str]:
    if isinstance(xs, str) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        if not isinstance(x, str) or not x.strip():
            raise ValueError(f"{name}[{i}] must be a non-empty str, got {x!r}")
    if not xs:
        raise ValueError(f"{name} is empty; pass at least one")
    return list(xs)


def record_step(result: RLResult, step: int, metrics: dict, on_step: OnStep | None,
                group: Ranks = Ranks()) -> None:
    """Keep a step's metrics and hand them to the caller's callback (MLflow, progress lines; rank 0 only)."""
    result.metrics.append(metrics)
    if on_step is not None and group.main:
        on_step(step, metrics)


def finish(result: RLResult, policy, tokenizer, out_dir, start: float, group: Ranks = Ranks()) -> RLResult:
    """Save the trained policy (all or nothing; rank 0 alone when data-parallel) and close the
    result with the wall time since `start`."""
    result.out_dir = save_policy(policy, tokenizer, out_dir) if group.main else Path(out_dir).resolve()
    result.seconds = time.perf_counter() - start
    return result
