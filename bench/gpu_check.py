"""Device check: every kind of model work the pipeline does, once, on one device, in seconds.

    python bench/gpu_check.py                  # CUDA when torch sees it, else CPU
    python bench/gpu_check.py --device cuda    # fail (exit 1) unless it all runs on the GPU
    python bench/gpu_check.py --device cpu     # the same steps here (tests/test_gpu_env.py runs it)

For the day a GPU is lent: it needs only torch and transformers (no Spark, Delta, MLflow,
cai_lib, weights or hub), so it runs in the GPU environment (`make gpu-env`) or any CUDA
image straight after `pip install torch transformers`, and is known to work beforehand
because the tests run it on CPU. The model is a tiny Llama built in-process (2 layers, hidden
64, vocabulary 512, random weights) fed token ids directly: the check is about where and how
the work runs, not about text quality. Steps, in the pipeline's order:

  generate  a batch of sampled continuations (sl-generate, sample-pairs, evaluate)
  score     log P(continuation | prompt) for a batch (label, eval-labeler)
  sft       one supervised step, loss on the response tokens only (train-sl)
  pm        one preference-model step: backbone + scalar head, BCE on sigmoid(r_A - r_B) (train-pm)
  ppo       one PPO update: policy + frozen reference + value head, clipped surrogate (train-rl)
  dpo       one DPO step: policy + frozen reference, -log sigmoid(beta * margin) (train-rl --algo dpo)

Each step prints the device and dtype of every model and tensor it used, its wall time
(best of --repeat, CUDA synchronised) and a rate; then peak GPU memory. Any tensor on another
device than asked for, a non-finite loss or an update that changed no weight fails the check.
On one H100/H200 the whole run takes well under a minute after CUDA starts (budget: 5 min).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, PAD, EOS = 512, 0, 1


class CheckFailed(RuntimeError):
    """The device check found work that ran elsewhere than asked, or did not learn."""


def tiny_llama(device: str, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights: the same code paths as a real checkpoint, no download."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=PAD, bos_token_id=2, eos_token_id=EOS, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def where(device: str, **named) -> list[str]:
    """'name: device dtype shape' for models and tensors; CheckFailed if one is on another device."""
    lines = []
    for name, obj in named.items():
        t = next(obj.parameters()) if isinstance(obj, torch.nn.Module) else obj
        if t.device.type != torch.device(device).type:
            raise CheckFailed(f"{name} is on {t.device}, not {device}: something moved it back. Fix the .to(device) "
                              "of that model or tensor")
        kind = "model" if isinstance(obj, torch.nn.Module) else "tensor"
        shape = list(t.shape) if kind == "tensor" else ""
        lines.append(f"{name}={kind}@{t.device}/{str(t.dtype).removeprefix('torch.')}{shape}")
    return lines


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, repeat: int, fn):
    """(result of the last run, best wall seconds): the first CUDA run pays for kernel loading."""
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return out, best


def batch(device: str, rows: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=g).to(device)


def seq_logprobs(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Sum of log P(ids[:, j] | ids[:, :j]) for j >= start, per row (the scoring and RL quantity)."""
    logits = model(input_ids=ids).logits[:, start - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, start:, None]).squeeze(-1).sum(-1)


def optimizer_step(model, loss: torch.Tensor, extra=()) -> bool:
    """One AdamW step; whether any weight changed (a step that changes nothing is a silent failure)."""
    params = [p for p in model.parameters() if p.requires_grad] + [p for m in extra for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = params[0].detach().clone()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return not torch.equal(before, params[0].detach())


def check_loss(name: str, loss: torch.Tensor, changed: bool) -> float:
    value = float(loss.detach())
    if not torch.isfinite(loss):
        raise CheckFailed(f"{name}: loss is {value}. Fix: run with --dtype float32 to tell a dtype problem from a bug")
    if not changed:
        raise CheckFailed(f"{name}: the optimizer step changed no weight (no gradient reached them)")
    return value


# -- the steps -----------------------------------------------------------------------------
def step_generate(a, model):
    prompts = batch(a.device, a.rows, a.prompt_len, 1)

    def run():
        torch.manual_seed(0)                 # generate() samples from torch's global RNG
        with torch.inference_mode():
            return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                  temperature=0.8, top_p=0.9, max_new_tokens=a.new_tokens,
                                  min_new_tokens=a.new_tokens, pad_token_id=PAD)
    out, s = timed(a.device, a.repeat, run)
    new = out.shape[0] * (out.shape[1] - prompts.shape[1])
    return where(a.device, policy=model, prompts=prompts, sequences=out), s, f"{new / s:,.0f} new tokens/s"


def step_score(a, model):
    ids = batch(a.device, a.rows, a.prompt_len + 8, 2)

    def run():
        with torch.inference_mode():
            return seq_logprobs(model, ids, a.prompt_len)
    lp, s = timed(a.device, a.repeat, run)
    if not bool(torch.isfinite(lp).all() and (lp < 0).all()):
        raise CheckFailed(f"score: log-probs must be finite and negative, got {lp.tolist()}")
    return where(a.device, scorer=model, ids=ids, logprobs=lp), s, f"{ids.numel() / s:,.0f} tokens/s scored"


def step_sft(a, model):
    ids = batch(a.device, a.rows, a.prompt_len + a.new_tokens, 3)
    labels = ids.clone()
    labels[:, :a.prompt_len] = -100          # the prompt is context, the response is learned

    def run():
        loss = model(input_ids=ids, labels=labels).loss
        return loss, optimizer_step(model, loss)
    (loss, changed), s = timed(a.device, a.repeat, run)
    return where(a.device, policy=model, ids=ids, loss=loss), s, f"loss {check_loss('sft', loss, changed):.3f}"


def step_pm(a, model):
    backbone = model.model                   # LlamaModel: hidden states, no LM head
    head = torch.nn.Linear(backbone.config.hidden_size, 1).to(a.device, a.dtype)
    length = a.prompt_len + a.new_tokens
    chosen, rejected = batch(a.device, a.rows, length, 4), batch(a.device, a.rows, length, 5)

    def reward(ids):
        return head(backbone(input_ids=ids).last_hidden_state[:, -1]).squeeze(-1).float()

    def run():
        r_a, r_b = reward(chosen), reward(rejected)
        loss = F.binary_cross_entropy_with_logits(r_a - r_b, torch.ones_like(r_a))  # P(A preferred) = sigmoid(rA - rB)
        return loss, r_a, optimizer_step(backbone, loss, extra=[head])
    (loss, r_a, changed), s = timed(a.device, a.repeat, run)
    return (where(a.device, backbone=backbone, head=head, chosen=chosen, rewards=r_a, loss=loss), s,
            f"loss {check_loss('pm', loss, changed):.3f}")


def step_ppo(a, policy, clip: float = 0.2, kl_coef: float = 0.05):
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    value_head = torch.nn.Linear(policy.config.hidden_size, 1).to(a.device, a.dtype)
    prompts, P = batch(a.device, a.rows, a.prompt_len, 6), a.prompt_len

    def token_logprobs(model, ids, hidden=False):
        out = model(input_ids=ids, output_hidden_states=hidden)
        lp = torch.log_softmax(out.logits[:, P - 1:-1].float(), -1).gather(-1, ids[:, P:, None]).squeeze(-1)
        return lp, (out.hidden_states[-1][:, P - 1:-1] if hidden else None)

    def run():
        with torch.no_grad():                # rollout: sample, then old/ref log-probs and a reward
            seqs = policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                   max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=PAD)
            old, _ = token_logprobs(policy, seqs)
            ref, _ = token_logprobs(reference, seqs)
            score = torch.randn(seqs.shape[0], device=a.device)        # the PM's reward stands here
            rewards = -kl_coef * (old - ref)
            rewards[:, -1] += score
            returns = rewards.flip(-1).cumsum(-1).flip(-1)             # gamma = 1, no GAE: enough to run the math
        new, hidden = token_logprobs(policy, seqs, hidden=True)
        values = value_head(hidden).squeeze(-1).float()
        adv = returns - values.detach()
        adv = (adv - adv.mean()) / (adv.std() + 1e-6)
        ratio = torch.exp(new - old)
        pg = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
        loss = pg + 0.5 * F.mse_loss(values, returns)
        return loss, seqs, optimizer_step(policy, loss, extra=[value_head])
    (loss, seqs, changed), s = timed(a.device, a.repeat, run)
    return (where(a.device, policy=policy, reference=reference, value_head=value_head, rollout=seqs, loss=loss), s,
            f"loss {check_loss('ppo', loss, changed):.3f}")


def step_dpo(a, policy, beta: float = 0.1):
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    length = a.prompt_len + a.new_tokens
    chosen, rejected = batch(a.device, a.rows, length, 7), batch(a.device, a.rows, length, 8)
    rejected[:, :a.prompt_len] = chosen[:, :a.prompt_len]       # one prompt, two responses

    def run():
        with torch.no_grad():
            ref_margin = seq_logprobs(reference, chosen, a.prompt_len) - seq_logprobs(reference, rejected, a.prompt_len)
        margin = seq_logprobs(policy, chosen, a.prompt_len) - seq_logprobs(policy, rejected, a.prompt_len)
        loss = -F.logsigmoid(beta * (margin - ref_margin)).mean()
        return loss, optimizer_step(policy, loss)
    (loss, changed), s = timed(a.device, a.repeat, run)
    return (where(a.device, policy=policy, reference=reference, chosen=chosen, loss=loss), s,
            f"loss {check_loss('dpo', loss, changed):.3f}")


STEPS = {"generate": step_generate, "score": step_score, "sft": step_sft, "pm": step_pm, "ppo": step_ppo,
         "dpo": step_dpo}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when torch sees it) | cuda | cuda:N | cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--rows", type=int, default=8, help="sequences per batch")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2, help="runs per step; the best time is shown")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    a = ap.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA device. Fix: run on the GPU machine, "
                 "in an environment with a CUDA build of torch (`make gpu-env`), or pass --device cpu")
    a.dtype = getattr(torch, a.dtype if a.dtype != "auto" else ("bfloat16" if a.device.startswith("cuda") else "float32"))
    unknown = set(a.steps.split(",")) - set(STEPS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}: choose from {','.join(STEPS)}")
    return a


def header(a) -> str:
    import transformers
    gpu = (f"{torch.cuda.get_device_name(a.device)} (CUDA {torch.version.cuda}, capability "
           f"{'.'.join(map(str, torch.cuda.get_device_capability(a.device)))})" if a.device.startswith("cuda") else "none")
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, device {a.device}, "
            f"dtype {str(a.dtype).removeprefix('torch.')}, GPU {gpu}")


def main(argv=None) -> int:
    a = parse(argv)
    print(f"gpu_check: {header(a)}")
    torch.manual_seed(0)
    t_all = time.perf_counter()
    failed = []
    for name in a.steps.split(","):
        model = tiny_llama(a.device, a.dtype, seed=0)
        try:
            lines, seconds, rate = STEPS[name](a, model)
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
