"""Every lake table's shape, in one place. Imports nothing of ours (the leaf of the layering).

Jobs, tests and quality suites import these; `cai_lib.lake.tables` creates tables from them.
"""
from schemas.tables import (  # noqa: F401
    GATE_EVENTS,
    GENERATION_EVENTS,
    GENERATION_KINDS,
    LABEL_EVENTS,
    PREFERENCE_DATASET,
    PROMPT_KINDS,
    PROMPTS,
    QUARANTINE,
    SL_DATASET,
    TABLES,
    TableSpec,
    WORK_BATCHES,
)
from schemas.review import REVIEW_EVENTS, VERDICTS  # noqa: F401,E402
