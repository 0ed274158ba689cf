"""Review in Label Studio or Argilla: the queue out as their task files, their annotations back as
review_events rows. Pure functions over dicts; jobs/review.py reads and writes the files.

Export (`cai review export`) writes one task per queue item: the principle, the prompt and the two
responses as "response 1" and "response 2" in an order drawn per comparison (`export_order`: the tool
shows every annotator the same task), the AI label as a prediction (Label Studio) or suggestion
(Argilla), and what the import needs back (comparison id, shown order, queue reasons, export time).
- Label Studio: a JSON list of tasks `{"data": {...}, "predictions": [{"model_version", "score",
  "result": [{"from_name": "preference", "to_name": "response_1,response_2", "type": "pairwise",
  "value": {"selected": "left"}}]}]}` for the labeling config LABEL_STUDIO_CONFIG (a Pairwise tag for
  the sides, a Choices tag for tie / both_bad, a TextArea for a note; Text tags show model text as text).
- Argilla 2.x: the JSON list `dataset.records.to_json` writes and `dataset.records.from_json` reads:
  `{"id", "fields", "metadata", "suggestions": {"preference": {"value", "score", "agent"}}, "responses": {}}`,
  for a dataset made with ARGILLA_SETTINGS (see docs/review.md).

Import (`cai review import`) reads those tools' exports back: a Label Studio JSON export (tasks with
`annotations`) or an Argilla `records.to_json` file (records with `responses`). The reviewer is the
value at `reviewer_field` (a dotted path in the annotation or response). verdict_at, part of the
event id, is the annotation's `updated_at` (Label Studio) or the export time (Argilla's records file
carries no response time), so importing a file twice lands once. Cancelled Label Studio annotations
and Argilla responses whose status is not "submitted" are skipped and counted. A row that cannot be
read is an AnnotationError naming the file, the row and the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from cai_lib.review.queue import REASONS, QueueItem
from cai_lib.review.verdicts import CHOICES, review_row, shown_order

FORMATS = ("label-studio", "argilla")
ARGILLA_LABELS = {"response_1": "first", "response_2": "second", "tie": "tie", "both_bad": "both_bad"}
PAIRWISE = {"left": "first", "right": "second"}
DEFAULT_REVIEWER_FIELD = {"label-studio": "completed_by.email", "argilla": "user_id"}
LABEL_STUDIO_CONFIG = """<View>
  <Header value="$principle"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Which response is better under this principle? Click it, or pick tie / both bad."/>
  <Pairwise name="preference" toName="response_1,response_2"/>
  <View style="display: flex;">
    <View style="flex: 1; margin-right: 1em;"><Text name="response_1" value="$response_1"/></View>
    <View style="flex: 1;"><Text name="response_2" value="$response_2"/></View>
  </View>
  <Choices name="neither" toName="prompt" choice="single" showInline="true">
    <Choice value="tie"/>
    <Choice value="both_bad"/>
  </Choices>
  <TextArea name="note" toName="prompt" maxSubmissions="1" placeholder="note (optional)"/>
</View>
"""
ARGILLA_SETTINGS = """rg.Settings(
    fields=[rg.TextField("principle"), rg.TextField("prompt"), rg.TextField("response_1"), rg.TextField("response_2")],
    questions=[rg.LabelQuestion("preference", labels=["response_1", "response_2", "tie", "both_bad"]),
               rg.TextQuestion("note", required=False)],
    allow_extra_metadata=True)"""


class AnnotationError(ValueError):
    """An annotation file row that cannot become a verdict; nothing was imported."""


@dataclass(frozen=True)
class Annotation:
    where: str                  # "task 3, annotation 1": for messages
    comparison_id: str
    choice: str                 # first | second | tie | both_bad, about the sides as shown
    shown_order: str
    queue_reasons: tuple[str, ...]
    reviewer: str
    verdict_at: datetime
    note: str | None


def export_order(comparison_id: str) -> str:
    """'ab' (response A shown as response 1) or 'ba': drawn per comparison, the same for every annotator."""
    return shown_order("export", comparison_id)


def ai_choice(p_a: float, order: str) -> tuple[str, float]:
    """The AI label as an answer about the shown sides, with its probability: (first | second | tie, score).

    >>> ai_choice(0.8, "ab"), ai_choice(0.8, "ba"), ai_choice(0.5, "ab")
    (('first', 0.8), ('second', 0.8), ('tie', 0.5))
    """
    if p_a == 0.5:
        return "tie", 0.5
    first_is_a = order == "ab"
    return ("first" if (p_a > 0.5) == first_is_a else "second"), round(max(p_a, 1 - p_a), 6)


def _shown(item: QueueItem, prompt: str, texts: dict, principle: str) -> tuple[str, dict]:
    c = item.comparison
    order = export_order(c.comparison_id)
    first, second = (c.response_a_id, c.response_b_id) if order == "ab" else (c.response_b_id, c.response_a_id)
    return order, {"principle": principle, "prompt": prompt, "response_1": texts[first], "response_2": texts[second]}


def label_studio_task(item: QueueItem, prompt: str, texts: dict, principle: str, exported_at: datetime) -> dict:
    """One Label Studio task (data + the AI's prediction) for a queue item; texts: response id -> text."""
    c = item.comparison
    order, shown = _shown(item, prompt, texts, principle)
    choice, score = ai_choice(c.p_a, order)
    result = ({"from_name": "preference", "to_name": "response_1,response_2", "type": "pairwise",
               "value": {"selected": "left" if choice == "first" else "right"}} if choice != "tie" else
              {"from_name": "neither", "to_name": "prompt", "type": "choices", "value": {"choices": ["tie"]}})
    return {"data": {**shown, "comparison_id": c.comparison_id, "shown_order": order,
                     "queue_reasons": list(item.reasons), "exported_at": exported_at.isoformat()},
            "predictions": [{"model_version": _agent(c), "score": score, "result": [result]}]}


def argilla_record(item: QueueItem, prompt: str, texts: dict, principle: str, exported_at: datetime) -> dict:
    """One Argilla 2.x record (records.to_json's shape) for a queue item, the AI label as a suggestion."""
    c = item.comparison
    order, shown = _shown(item, prompt, texts, principle)
    choice, score = ai_choice(c.p_a, order)
    label = {v: k for k, v in ARGILLA_LABELS.items()}[choice]
    return {"id": c.comparison_id, "fields": shown,
            "metadata": {"comparison_id": c.comparison_id, "shown_order": order,
                         "queue_reasons": ",".join(item.reasons), "exported_at": exported_at.isoformat(),
                         "principle_id": c.principle_id, "constitution_sha": c.constitution_sha},
            "suggestions": {"preference": {"value": label, "score": score, "agent": _agent(c)}},
            "responses": {}, "vectors": {}}


def export_tasks(fmt: str, items: list[QueueItem], prompts: dict[str, str], texts: dict[str, str],
                 principle_texts: dict[tuple[str, str], str], exported_at: datetime) -> list[dict]:
    """The queue as one format's task list (prompts: prompt id -> text; texts: response id -> text;
    principle_texts: (constitution sha, principle id) -> text, where the constitution file was given)."""
    if fmt not in FORMATS:
        raise ValueError(f"review format must be one of {FORMATS}, got {fmt!r}")
    task = label_studio_task if fmt == "label-studio" else argilla_record
    out = []
    for i in items:
        c = i.comparison
        text = principle_texts.get((c.constitution_sha, c.principle_id))
        principle = f"{c.principle_id}: {text}" if text else f"{c.principle_id} (its text: constitution {c.constitution_id})"
        out.append(task(i, prompts[c.prompt_id], texts, principle, exported_at))
    return out


def _agent(c) -> str:
    return f"{c.kind} {c.model_fingerprint[:12]} constitution {c.constitution_sha[:12]}"


# ------------------------------------------------------------------ import

def _get(obj, path: str, where: str, source: str):
    """The value at a dotted path (`completed_by.email`), or an AnnotationError naming it."""
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise AnnotationError(f"{source}: {where}: no field {path!r}. Fix: pass the field that names the "
                                  "reviewer with --reviewer-field (a dotted path, e.g. completed_by.email)")
        obj = obj[part]
    return obj


def _reviewer(value, path: str, where: str, source: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise AnnotationError(f"{source}: {where}: field {path!r} is {value!r}, not a reviewer name or id. Fix: "
                              "pass a field holding a string or number with --reviewer-field")
    return str(value).strip()


def _time(text, field: str, where: str, source: str) -> datetime:
    try:
        t = datetime.fromisoformat(str(text))
    except ValueError:
        t = None
    if t is None or t.tzinfo is None:
        raise AnnotationError(f"{source}: {where}: field {field!r} is {text!r}, not an ISO time with a time zone "
                              "(e.g. 2026-01-02T10:00:00Z)")
    return t.astimezone(timezone.utc)


def _meta(d: dict, where: str, source: str) -> tuple[str, str, tuple[str, ...]]:
    """(comparison_id, shown_order, queue_reasons) as the export wrote them."""
    cid, order, reasons = (d.get(k) for k in ("comparison_id", "shown_order", "queue_reasons"))
    if isinstance(reasons, str):
        reasons = [r for r in reasons.split(",") if r]
    if not isinstance(cid, str) or not cid:
        raise AnnotationError(f"{source}: {where}: field 'comparison_id' is missing: import a file that "
                              "`cai review export` wrote (and the tool exported with its data)")
    if order not in ("ab", "ba"):
        raise AnnotationError(f"{source}: {where}: field 'shown_order' is {order!r}, not 'ab' or 'ba'")
    if not isinstance(reasons, list) or not set(reasons) <= set(REASONS):
        raise AnnotationError(f"{source}: {where}: field 'queue_reasons' is {reasons!r}; each must be one of {REASONS}")
    return cid, order, tuple(reasons)


def _rows(data, source: str, what: str) -> list:
    if not isinstance(data, list):
        raise AnnotationError(f"{source}: expected a JSON list of {what}, got {type(data).__name__}")
    return data


def read_label_studio(data, reviewer_field: str, source: str) -> tuple[list[Annotation], int]:
    """A Label Studio JSON export -> (annotations, how many were skipped as cancelled)."""
    out, skipped = [], 0
    for i, task in enumerate(_rows(data, source, "Label Studio tasks"), 1):
        meta = _meta(_get(task, "data", f"task {i}", source), f"task {i}", source)
        for j, ann in enumerate(task.get("annotations") or [], 1):
            where = f"task {i} ({meta[0][:12]}), annotation {j}"
            if ann.get("was_cancelled"):
                skipped += 1
                continue
            choice, note = _ls_choice(_get(ann, "result", where, source), where, source)
            reviewer = _reviewer(_get(ann, reviewer_field, where, source), reviewer_field, where, source)
            at = _time(_get(ann, "updated_at", where, source), "updated_at", where, source)
            out.append(Annotation(where, meta[0], choice, meta[1], meta[2], reviewer, at, note))
    return out, skipped


def _ls_choice(result, where: str, source: str) -> tuple[str, str | None]:
    """The choice (first | second | tie | both_bad) and note in one Label Studio annotation's result."""
    if not isinstance(result, list):
        raise AnnotationError(f"{source}: {where}: field 'result' is not a list")
    found, note = [], None
    for r in result:
        kind, value = (r or {}).get("type"), (r or {}).get("value") or {}
        if kind == "pairwise" and value.get("selected") in PAIRWISE:
            found.append(PAIRWISE[value["selected"]])
        elif kind == "choices" and r.get("from_name") == "neither":
            found.extend(c for c in value.get("choices") or [] if c in ("tie", "both_bad"))
        elif kind == "textarea" and r.get("from_name") == "note":
            note = " ".join(value.get("text") or []) or None
    if len(found) != 1:
        raise AnnotationError(f"{source}: {where}: field 'result' holds {len(found)} verdicts ({found}); an "
                              "annotation needs exactly one: a side (pairwise left/right) or tie / both_bad")
    return found[0], note


def read_argilla(data, reviewer_field: str, source: str) -> tuple[list[Annotation], int]:
    """An Argilla records.to_json file -> (annotations, how many responses were skipped as not submitted)."""
    out, skipped = [], 0
    for i, rec in enumerate(_rows(data, source, "Argilla records"), 1):
        meta_d = _get(rec, "metadata", f"record {i}", source)
        cid, order, reasons = _meta(meta_d, f"record {i}", source)
        at = _time(meta_d.get("exported_at"), "metadata.exported_at", f"record {i}", source)
        responses = rec.get("responses") or {}
        notes = {str(n.get("user_id")): n.get("value") for n in responses.get("note") or []}
        for j, resp in enumerate(responses.get("preference") or [], 1):
            where = f"record {i} ({cid[:12]}), response {j}"
            if resp.get("status", "submitted") != "submitted":
                skipped += 1
                continue
            label = resp.get("value")
            if label not in ARGILLA_LABELS:
                raise AnnotationError(f"{source}: {where}: field 'value' is {label!r}; the preference question's "
                                      f"labels are {list(ARGILLA_LABELS)}")
            reviewer = _reviewer(_get(resp, reviewer_field, where, source), reviewer_field, where, source)
            note = notes.get(str(resp.get("user_id")))
            out.append(Annotation(where, cid, ARGILLA_LABELS[label], order, reasons, reviewer, at,
                                  note if isinstance(note, str) and note.strip() else None))
    return out, skipped


def read_annotations(fmt: str, data, reviewer_field: str | None, source: str) -> tuple[list[Annotation], int]:
    if fmt not in FORMATS:
        raise ValueError(f"review format must be one of {FORMATS}, got {fmt!r}")
    read = read_label_studio if fmt == "label-studio" else read_argilla
    return read(data, reviewer_field or DEFAULT_REVIEWER_FIELD[fmt], source)


def review_rows(annotations: list[Annotation], comparisons: dict, now: datetime, source: str) -> list[dict]:
    """review_events rows of the annotations; comparisons: comparison_id -> queue.Comparison of this lake."""
    out = []
    for a in annotations:
        c = comparisons.get(a.comparison_id)
        if c is None:
            raise AnnotationError(f"{source}: {a.where}: comparison {a.comparison_id} is not in this lake's "
                                  "label_events. Fix: import into the lake the tasks were exported from")
        assert a.choice in CHOICES
        out.append(review_row(c, a.queue_reasons, reviewer=a.reviewer, choice=a.choice, note=a.note,
                              verdict_at=a.verdict_at, now=now, order=a.shown_order))
    return out


def new_rows(rows: list[dict], stored: dict[str, str], source: str) -> tuple[list[dict], int]:
    """(the rows review_events lacks, one per event id; how many it holds already). stored: event id ->
    verdict of the rows already there. One id with two verdicts (an answer changed after its import,
    or twice in one file) is an error: the id cannot say which one stands."""
    seen: dict[str, dict] = {}
    for r in rows:
        before = stored.get(r["event_id"]) or (seen[r["event_id"]]["verdict"] if r["event_id"] in seen else None)
        if before is not None and before != r["verdict"]:
            raise AnnotationError(f"{source}: reviewer {r['reviewer']!r} on comparison {r['comparison_id'][:12]} at "
                                  f"{r['verdict_at'].isoformat()} reads {r['verdict']}, but review_events (or this "
                                  f"file) has {before} for the same verdict id. Fix: export again to record a new "
                                  "verdict; an imported one is never changed")
        seen.setdefault(r["event_id"], r)
    fresh = [r for e, r in seen.items() if e not in stored]
    return fresh, len(seen) - len(fresh)
