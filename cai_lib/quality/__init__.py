"""Quality gates: the signals, the frames they are computed on, and the Great Expectations run.

signals  refusal detector, boilerplate, revision change, word counts (plain functions, doctested)
injection  responses that address the labeller ("note to the evaluator", "the correct answer is (A)")
frames   the frames a gate validates: lake tables minus quarantined rows, plus derived columns
stats    Wilson and bootstrap intervals: every rate a gate or promotion judges is a range
gates    run a stage's checks (declared in `schemas/suites.py`) with Great Expectations
"""
