"""Readers of user and evaluation data files: pure Python, no Spark, no lake.

prompts    prompt files (demo JSONL, HH-RLHF jsonl.gz, red-team JSON/JSONL, CSV) -> `PromptRecord`s
eval_data  held-out human labels (HH-RLHF pairs) and the paper's HHH evaluation
"""
