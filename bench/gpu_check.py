"""Device check: every kind of model work the pipeline does, once, on one device, in seconds, by cai_lib's own code.

    python bench/gpu_check.py                  # CUDA when torch sees it, else CPU
    python bench/gpu_check.py --device cuda    # fail (exit 1) unless it all runs on the GPU
    python bench/gpu_check.py --device cpu     # the same steps here (tests/test_gpu_env.py runs it)

For the day a GPU is lent. Each step calls the project's code, the code `cai` jobs run: the
transformers backend (cai_lib/backends) and the trainers (cai_lib/training), nothing written
again here. It needs this checkout and only torch and transformers (with what they install:
tokenizers, safetensors, numpy, pyyaml, jinja2): no Spark, Delta, Arrow, pandas, MLflow, weights
or hub, so it runs in any CUDA image straight after `pip install torch transformers`, and is
known to work beforehand because the tests run it on CPU (and check that nothing else is imported).
The model is a tiny Llama (2 layers, hidden 64, random weights) and a byte-level BPE tokenizer
trained here on a few sentences, with a chat template; both are saved to a temporary folder that
every step loads as its model path, through the project's loaders. The check is about where and
how the work runs, not about text quality. Steps, in the pipeline's order:

  generate  TransformersBackend.generate: a batch of sampled replies (sl-generate, sample-pairs, evaluate)
  score     TransformersBackend.choice_logprobs: log P(" (A)" | prompt) and " (B)" (label, eval-labeler)
  sft       train_sft, one optimizer step, full fine-tune (train-sl)
  pm        train_pm, one step with the backbone trained: PreferenceModel + pm_loss (train-pm)
  ppo       one PPO update of train_ppo: its policy, frozen reference and value head (_PPORun.start),
            rollout, PMReward scores, KL-penalised rewards, GAE, the clipped losses (_PPORun.update;
            the text metrics of an iteration, which need pandas, are left out) (train-rl)
  dpo       train_dpo, one optimizer step (train-rl --algo dpo)

Each step prints the device and dtype of every model that ran and of the tensors in and out of its
first call (seen by a forward hook on every torch module while the step runs), its wall time (best
of --repeat, CUDA synchronised; the training steps' time includes their load and save) and a rate
or its losses; then peak GPU memory. Any module weight or tensor on another device than asked for,
a non-finite loss or an update that changed no weight fails the check (exit 1). On one H100/H200
the whole run takes well under a minute after CUDA starts (budget: 5 min).
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # cai_lib from this checkout, wherever the script is started

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from cai_lib.backends.base import Sampling  # noqa: E402
from cai_lib.backends.transformers_backend import TransformersBackend  # noqa: E402
from cai_lib.training.distributed import ranks  # noqa: E402
from cai_lib.training.dpo import train_dpo  # noqa: E402
from cai_lib.training.pm_model import PreferenceModel  # noqa: E402
from cai_lib.training.pm_train import PMSettings, train_pm  # noqa: E402
from cai_lib.training.policy import RLSettings, render_chat  # noqa: E402
from cai_lib.training.ppo import PMReward, _PPORun  # noqa: E402
from cai_lib.training.sft import SFTSettings, train_sft  # noqa: E402

# the tokenizer's training text, and the prompts and replies of every step
CORPUS = ("How do I bake bread at home?", "Mix flour, water, salt and yeast, then let the dough rise.",
          "I can't help with that, but here is something safer to try.", "Water the fern once a week.",
          "The assistant answers briefly, kindly and honestly.", "What is the capital of France? Paris.")
PAD, BOS, EOS = "<|pad|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 320     # 256 bytes, 3 special tokens, the merges the corpus yields
LR = 1e-3       # large enough that one step visibly moves bf16 weights


class CheckFailed(RuntimeError):
    """The device check found work that ran elsewhere than asked, or did not learn."""


# -- the model folder every step loads --------------------------------------------------------
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on CORPUS (any text encodes, no unknown token), with pad/EOS and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[PAD, BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_folder(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a 2-layer random Llama (float32 safetensors) and its tokenizer to `folder`; its weights."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def texts(n: int, offset: int = 0) -> list[str]:
    return [f"{CORPUS[(i + offset) % len(CORPUS)]} ({i})" for i in range(n)]


# -- where the work ran ------------------------------------------------------------------------
def _tensors(obj, depth: int = 0):
    """The tensors in a module's inputs or outputs (nested tuples, lists, dicts and ModelOutputs)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth + 1)


def _describe(t: torch.Tensor, shape: bool = True) -> str:
    return f"@{t.device}/{str(t.dtype).removeprefix('torch.')}" + (str(list(t.shape)) if shape else "")


class DeviceWatch:
    """While active, every torch module call: its own weights and every tensor in and out must be on
    `device` (else a violation is kept); the outermost calls (the models the project ran) are listed."""

    def __init__(self, device: str):
        self.want, self.depth, self.handles = torch.device(device), 0, []
        self.seen: dict[str, str] = {}           # 'name' -> 'kind@device/dtype[shape]', first call only
        self.wrong: list[str] = []               # 'what is on where', the first 5 kinds

    def _on(self, t: torch.Tensor) -> bool:
        return t.device.type == self.want.type and (self.want.index is None or t.device.index == self.want.index)

    def _pre(self, module, args):
        self.depth += 1

    def _post(self, module, args, kwargs, output):
        self.depth -= 1
        name = type(module).__name__
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        named = [(f"{name}.{k}", t) for k, v in kwargs.items() for t in _tensors(v)]
        named += [(f"{name}.arg{i}", t) for i, v in enumerate(args) for t in _tensors(v)]
        outs = output.items() if isinstance(output, dict) else [("out", output)]
        named += [(f"{name}.{k}", t) for k, v in outs for t in _tensors(v)]
        for what, t in [(f"{name} weights", p) for p in own] + named:
            problem = f"{what} is on {t.device}"
            if not self._on(t) and len(self.wrong) < 5 and problem not in self.wrong:
                self.wrong.append(problem)
        if self.depth == 0:                      # an outermost call: a model the project ran
            first = next(module.parameters(), None)
            if first is not None:
                self.seen.setdefault(name, "model" + _describe(first, shape=False))
            for what, t in named:
                if not what.endswith(".hidden_states"):   # one tensor per layer: the weights' line says enough
                    self.seen.setdefault(what, "tensor" + _describe(t))

    def __enter__(self) -> "DeviceWatch":
        from torch.nn.modules import module as nn_module
        self.handles = [nn_module.register_module_forward_pre_hook(self._pre),
                        nn_module.register_module_forward_hook(self._post, with_kwargs=True, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def lines(self) -> list[str]:
        """'name=kind@device/dtype[shape]' for what ran; CheckFailed if anything ran on another device."""
        if self.wrong:
            raise CheckFailed(f"asked for {self.want} but {'; '.join(self.wrong)}: something moved it. Fix the "
                              "device the project code gives that model or tensor (its settings.device / .to)")
        if not self.seen:
            raise CheckFailed("no torch module ran in this step")
        return [f"{k}={v}" for k, v in self.seen.items()]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(a, fn):
    """(result of the last run, best wall seconds, the device lines): the first CUDA run pays for kernel loading."""
    best, out = float("inf"), None
    with DeviceWatch(a.device) as watch:
        for _ in range(a.repeat):
            sync(a.device)
            t0 = time.perf_counter()
            out = fn()
            sync(a.device)
            best = min(best, time.perf_counter() - t0)
    return out, best, watch.lines()


def changed(base: dict[str, torch.Tensor], state: dict[str, torch.Tensor], prefix: str = "") -> tuple[int, int]:
    """(tensors of `state` that differ from the starting weights, tensors compared)."""
    diff = sum(not torch.equal(t.detach().cpu(), base[prefix + k].to(t.dtype)) for k, t in state.items())
    return diff, len(state)


def verdict(step: str, losses: dict[str, float], moved: tuple[int, int]) -> str:
    """'loss 5.12, 21/21 tensors changed'; CheckFailed for a non-finite loss or no weight changed."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise CheckFailed(f"{step}: non-finite {bad}. Fix: run with --dtype float32 to tell a dtype problem from a bug")
    if moved[0] == 0:
        raise CheckFailed(f"{step}: the optimizer step changed none of {moved[1]} weight tensors "
                          "(no gradient reached them)")
    return ", ".join(f"{k} {v:.3f}" for k, v in losses.items()) + f", {moved[0]}/{moved[1]} tensors changed"


# -- the steps: each returns (device lines, best seconds, rate or losses) ---------------------
@dataclass
class Setup:
    folder: Path                         # the tiny model and tokenizer: every step's model path
    work: Path                           # the training steps' out_dirs
    base: dict[str, torch.Tensor]        # the folder's weights, to tell whether a step changed any
    runs: Iterator[int] = field(default_factory=itertools.count)

    def out_dir(self, step: str) -> Path:
        return self.work / f"{step}-{next(self.runs)}"


def step_generate(a, setup: Setup):
    backend = TransformersBackend(str(setup.folder), dtype=a.dtype, device=a.device, batch_size=a.rows)
    chats = [[{"role": "user", "content": t}] for t in texts(a.rows)]
    sampling = Sampling(temperature=0.8, top_p=0.9, max_new_tokens=a.new_tokens)
    gens, s, lines = timed(a, lambda: backend.generate(chats, sampling, seeds=list(range(a.rows))))
    errors = [g.error for g in gens if not g.ok]
    new = sum(g.completion_tokens for g in gens)
    if errors or not new:
        raise CheckFailed(f"generate: errors {errors}, {new} new tokens")
    return lines, s, f"{new / s:,.0f} new tokens/s"


def step_score(a, setup: Setup):
    backend = TransformersBackend(str(setup.folder), dtype=a.dtype, device=a.device, batch_size=a.rows)
    # prompts over PREFIX_BLOCK (64) tokens, so the cached prefix blocks are used too
    prompts = [backend.render_chat([{"role": "user", "content": " ".join(texts(4, i))}]) + "Answer:"
               for i in range(a.rows)]
    n_tokens = min(len(backend.tokenizer(p).input_ids) for p in prompts)
    lp, s, lines = timed(a, lambda: backend.choice_logprobs(prompts, [" (A)", " (B)"]))
    flat = [x for row in lp for x in row]
    if not all(math.isfinite(x) and x < 0 for x in flat):
        raise CheckFailed(f"score: log-probs must be finite and negative, got {flat}")
    return lines, s, f"{len(flat) / s:,.0f} choices/s (prompts >= {n_tokens} tokens)"


def step_sft(a, setup: Setup):
    rows = [{"key": f"k{i}", "prompt": p, "response": r}
            for i, (p, r) in enumerate(zip(texts(a.rows), texts(a.rows, 1)))]
    settings = SFTSettings(max_steps=1, batch_size=a.rows, heldout_fraction=0.0, learning_rate=LR, train_dtype=a.dtype,
                           device=a.device, seed=0)
    result, s, lines = timed(a, lambda: train_sft(setup.folder, rows, settings, setup.out_dir("sft")))
    return lines, s, verdict("sft", {"loss": result.train_losses[0]}, (result.changed_params, result.total_params))


def step_pm(a, setup: Setup):
    rows = [{"pair_id": f"p{i}", "prompt": p, "response_a": r, "response_b": r[::-1], "target": 0.8,
             "source": "ai_harmless"} for i, (p, r) in enumerate(zip(texts(a.rows), texts(a.rows, 2)))]
    settings = PMSettings(train_backbone=True, max_steps=1, batch_size=a.rows, heldout_fraction=0.0, seed=0,
                          learning_rate=LR, head_learning_rate=LR, backbone_dtype=a.dtype, device=a.device)
    result, s, lines = timed(a, lambda: train_pm(setup.folder, rows, settings, setup.out_dir("pm")))
    moved = changed(setup.base, result.pm.backbone.state_dict(), prefix="model.")
    return lines, s, verdict("pm", {"loss": result.train_losses[0]}, moved)


def step_ppo(a, setup: Setup):
    pm_dir = PreferenceModel.from_backbone(str(setup.folder), seed=0).save(setup.out_dir("ppo-pm"))  # the reward
    settings = RLSettings(steps=1, batch_size=a.rows, mini_batch_size=a.rows, ppo_epochs=1, max_new_tokens=a.new_tokens,
                          learning_rate=LR, device=a.device, seed=0)
    prompts = texts(a.rows)

    def run():
        ppo = _PPORun.start(setup.folder, settings, ranks())
        return ppo, ppo.update(0, prompts, [render_chat(ppo.tokenizer, p) for p in prompts], PMReward(pm_dir, a.device))
    (ppo, update), s, lines = timed(a, run)
    losses = {k: sum(d[k] for d in update.logs) / len(update.logs) for k in ("policy_loss", "value_loss")}
    return lines, s, verdict("ppo", losses, changed(setup.base, ppo.policy.state_dict()))


def step_dpo(a, setup: Setup):
    pairs = [{"prompt": p, "chosen": c, "rejected": c[::-1]} for p, c in zip(texts(a.rows), texts(a.rows, 3))]
    settings = RLSettings(algorithm="dpo", batch_size=a.rows, mini_batch_size=a.rows, dpo_max_steps=1, learning_rate=LR,
                          device=a.device, seed=0)
    metrics: list[dict] = []
    result, s, lines = timed(a, lambda: train_dpo(setup.folder, pairs, settings, setup.out_dir("dpo"),
                                                  on_step=lambda step, m: metrics.append(m)))
    saved = AutoModelForCausalLM.from_pretrained(result.out_dir, dtype=torch.float32, use_safetensors=True)
    return lines, s, verdict("dpo", {"loss": metrics[-1]["loss"]}, changed(setup.base, saved.state_dict()))


STEPS = {"generate": step_generate, "score": step_score, "sft": step_sft, "pm": step_pm, "ppo": step_ppo,
         "dpo": step_dpo}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when torch sees it) | cuda | cuda:N | cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="the backend's, SFT's and the PM's dtype; auto: bfloat16 on CUDA, float32 on CPU "
                         "(PPO and DPO always train in float32, as train-rl does)")
    ap.add_argument("--rows", type=int, default=8, help="prompts, rows or pairs per step")
    ap.add_argument("--new-tokens", type=int, default=16, help="generate's and PPO's max_new_tokens")
    ap.add_argument("--repeat", type=int, default=2, help="runs per step; the best time is shown")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    a = ap.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA device. Fix: run on the GPU machine, "
                 "in an environment with a CUDA build of torch (`make gpu-env`), or pass --device cpu")
    if a.dtype == "auto":
        a.dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    if a.dtype == "float16" and not a.device.startswith("cuda"):
        ap.error("--dtype float16 is for CUDA (train_sft refuses it on CPU): pass float32 or bfloat16")
    unknown = set(a.steps.split(",")) - set(STEPS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}: choose from {','.join(STEPS)}")
    return a


def header(a) -> str:
    gpu = (f"{torch.cuda.get_device_name(a.device)} (CUDA {torch.version.cuda}, capability "
           f"{'.'.join(map(str, torch.cuda.get_device_capability(a.device)))})" if a.device.startswith("cuda") else "none")
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, cai_lib from {ROOT}, "
            f"device {a.device}, dtype {a.dtype}, GPU {gpu}")


def main(argv=None) -> int:
    a = parse(argv)
    transformers.utils.logging.disable_progress_bar()   # one bar per load and save: noise in this output
    print(f"gpu_check: {header(a)}")
    t_all = time.perf_counter()
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        folder = Path(tmp) / "tiny-llama"
        setup = Setup(folder, Path(tmp), tiny_model_folder(folder))
        for name in a.steps.split(","):
            try:
                lines, seconds, rate = STEPS[name](a, setup)
                print(f"  {name:<8} ok   {seconds * 1000:8.1f} ms  {rate:<24} {' '.join(lines)}")
            except CheckFailed as exc:
                failed.append(name)
                print(f"  {name:<8} FAIL {exc}")
    if a.device.startswith("cuda"):
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(a.device) / 2**20:.1f} MiB")
    print(f"gpu_check: {'FAILED ' + ','.join(failed) if failed else 'all steps ran on ' + a.device} "
          f"in {time.perf_counter() - t_all:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
