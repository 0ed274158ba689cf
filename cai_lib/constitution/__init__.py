"""Constitutions and the prompt templates they drive.

model      the `Constitution` dataclasses, their validation and content sha
load       files: our YAML (or one of the paper's JSON files) -> a validated `Constitution`; YAML out
paper      the CAI paper's published JSON prompt files -> a `Constitution`
templates  prompt templates and output parsers of each SL step (pure functions)
"""
