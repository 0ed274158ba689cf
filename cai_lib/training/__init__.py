"""Training: SL-CAI fine-tune, the preference model, and RL (PPO or DPO). Plain torch + transformers.

inputs        what training may read: derived datasets minus every quarantined row
sft_examples  chat-rendered SFT examples (loss on response tokens only)
sft           the SL-CAI fine-tune loop (full or merged LoRA), safetensors in and out
pm_model      the preference model: backbone + scalar head on the last real token
pm_loss       the soft-label Bradley-Terry loss (pure torch)
pm_train      training and evaluating the PM on preference rows and held-out human pairs
ppo_math      PPO formulas: KL-penalised rewards, GAE, clipped losses, KL controllers, value head
policy        what PPO and DPO share: settings, policy loading, optimizer step, saving
ppo           the PPO loop of RL-CAI against a reward function (the PM), KL to the SL reference
dpo           weighted DPO on preference pairs (offline alternative)
distributed   data-parallel training through Spark's TorchDistributor: ranks, shards, all-reduces, rank 0 writes
checkpoint    step checkpoints (weights, optimizer, RNGs, data position) a killed SFT, PM, PPO or DPO run resumes from
"""
