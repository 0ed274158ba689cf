"""People in the loop: reviewers' verdicts on the AI comparisons the labels leave in doubt.

- queue: which comparisons to review, ranked (swap-inconsistent, near 0.5, principles disagreeing)
  plus a seeded audit sample; pure functions over label_events rows.
- verdicts: the page's display order per reviewer and the mapping back to the pair's A/B; review_events rows.
- store: the app's reads (delta-rs) and its idempotent verdict appends (delta-spark).
- dashboard: the dashboard's figures (audit agreement, swap consistency, calibration, gate verdicts); pure.
- charts: those figures as inline SVG strings (no JavaScript); pure.
- chains: a prompt's SL-CAI chains (first answer, critique -> revision per round) from its generation rows; pure.
- exchange: the queue as Label Studio tasks / Argilla records, and their annotations back as review_events rows; pure.
- app: the Starlette web app (templates/ holds its Jinja pages); `cai review serve` starts it.
"""
