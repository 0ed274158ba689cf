"""The frames a quality gate validates: lake tables minus quarantined rows, plus derived columns.

Each gate stage (`prompts`, `sl`, `labels`) reads the latest version of its tables, drops the
rows an earlier gate run already quarantined (they never train), and adds what the
expectations in `schemas.suites` look at: a refusal flag, a boilerplate flag and a revision
change per SL response, refusal rates per prompt category, swap consistency per AI
comparison, responses of AI-labelled comparisons that address the labeller (prompt injection),
and the labeller's evaluation metrics when `cai eval-labeler` has run.
A frame that is None has nothing to check (no CoT labels, no evaluation, ...): its checks
are reported as skipped, never as passed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cai_lib.feedback.label_metrics import swap_consistent
from cai_lib.ids import sha256_text
from cai_lib.lake.queries import training_prompt_texts
from cai_lib.lake.tables import Lake
from cai_lib.quality import signals as quality
from cai_lib.quality.injection import addresses_evaluator
from cai_lib.quality.stats import wilson_interval
from cai_lib.review.dashboard import agreement_figures
from cai_lib.review.store import read_reviews
from schemas.suites import AI_LABEL_KINDS, ROW_KEYS

STAGE_TABLES = {
    "prompts": ["prompts"],
    "sl": ["prompts", "generation_events", "sl_dataset"],  # SL training reads prompts too
    "labels": ["label_events", "preference_dataset"],
}


@dataclass
class Frames:
    frames: dict[str, pd.DataFrame | None]
    notes: dict[str, str] = field(default_factory=dict)  # frame -> why it is None, or what it found


def quarantined(lake: Lake) -> set[tuple[str, str]]:
    """(table, key) of every row a gate has quarantined."""
    q = lake.read("quarantine", columns=["stage", "source", "row_key"]).to_pandas()
    q = q[q["stage"].str.startswith("gate") & q["row_key"].notna()]
    return set(zip(q["source"], q["row_key"]))


def without_quarantined(df: pd.DataFrame, frame: str, bad: set[tuple[str, str]]) -> pd.DataFrame:
    key, table = ROW_KEYS[frame]
    keys = {k for t, k in bad if t == table}
    return df[~df[key].isin(keys)].reset_index(drop=True) if keys else df


def _read(lake: Lake, table: str, frame: str, bad) -> pd.DataFrame:
    return without_quarantined(lake.read(table).to_pandas(), frame, bad)


def prompt_frames(lake: Lake, t, bad) -> Frames:
    return Frames({"prompts": _read(lake, "prompts", "prompts", bad)})


def sl_frames(lake: Lake, t, bad) -> Frames:
    events = lake.read("generation_events").to_pandas()
    gen = without_quarantined(events[~events["kind"].isin(["pair_sample", "cot", "eval_response"])].reset_index(drop=True),
                              "generation_events", bad)
    sl = _read(lake, "sl_dataset", "sl_dataset", bad)
    texts = dict(zip(events["event_id"], events["text"]))
    notes = {}
    sl["change"] = [
        quality.revision_change(texts.get(chain[0]) or "", resp) if kind == "revision"
        else ("empty" if not (resp or "").strip() else None)
        for kind, chain, resp in zip(sl["source_kind"], sl["chain_event_ids"], sl["response"])]
    sl["words"] = [quality.word_count(r) or None for r in sl["response"].fillna("")]
    responses = sl["response"].fillna("").tolist()
    if len(responses) >= t.boilerplate_min_rows:
        sl["boilerplate"] = quality.boilerplate_rows(responses, threshold=t.max_boilerplate_share)
        share, text = quality.boilerplate_rate(responses)
        notes["sl_dataset"] = f"most shared sentence/8-gram: {share:.0%} of responses" + (f": {text!r}" if text else "")
    else:
        sl["boilerplate"] = False
        notes["sl_dataset"] = f"boilerplate not judged below {t.boilerplate_min_rows} responses"
    sl["refusal"] = [quality.is_refusal(r or "") for r in sl["response"]]
    revisions = sl["change"][sl["source_kind"] == "revision"]
    notes["sl_dataset"] = (f"{(revisions == 'unchanged').sum()} of {len(revisions)} final revisions unchanged, "
                           f"{(sl['change'] == 'empty').sum()} empty; " + notes["sl_dataset"])
    sl["prompt_kind"] = sl["source_kind"].map({"revision": "red_team", "helpful_response": "helpful"})
    frames = {"prompts": _read(lake, "prompts", "prompts", bad), "generation_events": gen, "sl_dataset": sl}
    for name, kind in (("refusal_red_team", "red_team"), ("refusal_benign", "helpful")):
        part = sl[sl["prompt_kind"] == kind].assign(category=lambda d: d["category"].fillna("(none)"))
        rates = None
        if len(part):  # per category, plus every response of the kind together as "(all)"
            rates = quality.refusal_rates(pd.concat([part, part.assign(category="(all)")]), text_col="response",
                                          group_col="category")
        if rates is not None:
            small = rates[rates["n"] < t.refusal_min_n]
            rates = rates[rates["n"] >= t.refusal_min_n].reset_index(drop=True)
            top = rates[rates["category"] != "(all)"].sort_values("refusal_rate", ascending=False).head(1)
            notes[name] = (f"{kind} refusal rate {part['refusal'].mean():.1%} overall; {len(rates) - 1} categories judged" +
                           (f", highest {top['category'].iloc[0]} {top['refusal_rate'].iloc[0]:.0%}" if len(top) else "")
                           + (f"; {len(small)} with < {t.refusal_min_n} responses not judged" if len(small) else ""))
        frames[name] = rates if rates is not None and len(rates) else None
        if frames[name] is None:
            notes.setdefault(name, f"no {kind} responses with >= {t.refusal_min_n} per category")
    return Frames(frames, notes)


def pair_consistency(labels: pd.DataFrame) -> pd.DataFrame | None:
    """One row per (pair, ensemble index) whose two orders are both labelled: do they agree?

    Pass labels inside [0, 1] only: the others are labels.p_a_range's, not probabilities.
    """
    both = labels.pivot_table(index=["pair_id", "ensemble_index"], columns="order", values="p_a", aggfunc="first")
    if "ab" not in both or "ba" not in both:
        return None
    both = both.dropna(subset=["ab", "ba"]).reset_index()
    if both.empty:
        return None
    both["consistent"] = [float(swap_consistent(a, b)) for a, b in zip(both["ab"], both["ba"])]
    return both[["pair_id", "ensemble_index", "consistent"]]


def labeller_eval(metrics_path: str | None, fingerprints: set[str]) -> tuple[pd.DataFrame | None, str]:
    """The last `cai eval-labeler` metrics, if they are about the model that made these labels."""
    if not metrics_path or not Path(metrics_path).exists():
        return None, f"no labeller evaluation at {metrics_path} (run cai eval-labeler)"
    m = json.loads(Path(metrics_path).read_text())
    if "human_accuracy" not in m:
        return None, f"{metrics_path} has no human-label metrics"
    if "human_accuracy_ci" not in m:
        return None, f"{metrics_path} has no confidence intervals (an older eval-labeler wrote it): rerun cai eval-labeler"
    if fingerprints and m.get("model_fingerprint") not in fingerprints:
        return None, (f"{metrics_path} evaluates model {m.get('model_fingerprint')}, not the labelling "
                      f"model(s) {sorted(fingerprints)}: rerun cai eval-labeler")
    row = {k: m.get(k) for k in ("human_accuracy", "human_ece", "human_n", "swap_consistency", "human_prob_std")}
    (row["human_accuracy_ci_low"], row["human_accuracy_ci_high"]) = m["human_accuracy_ci"]
    (row["human_ece_ci_low"], row["human_ece_ci_high"]) = m["human_ece_ci"]
    sc = m.get("swap_consistency_ci") or [None, None]
    return pd.DataFrame([row]), (
        f"labeller vs {m.get('human_n')} human pairs ({metrics_path}): agreement {m['human_accuracy']:.3f} "
        f"[{row['human_accuracy_ci_low']:.3f}, {row['human_accuracy_ci_high']:.3f}], ECE {m['human_ece']:.3f} "
        f"[{row['human_ece_ci_low']:.3f}, {row['human_ece_ci_high']:.3f}], swap consistency "
        f"{m.get('swap_consistency', float('nan')):.3f} [{_fmt(sc[0])}, {_fmt(sc[1])}], "
        f"label spread (std) {_fmt(m.get('human_prob_std'))}" + _failures_note(m))


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _failures_note(m: dict) -> str:
    failed, incomplete = m.get("failed_scorings") or 0, m.get("incomplete_pairs") or 0
    return f"; {failed} scorings failed, {incomplete} pairs incomplete" if failed or incomplete else ""


def contamination(metrics_path: str | None, lake: Lake) -> tuple[pd.DataFrame | None, str]:
    """The lake's training prompts that the labeller's evaluation also used (by normalised text)."""
    if not metrics_path or not Path(metrics_path).exists():
        return None, "no labeller evaluation to compare with the training prompts"
    used = json.loads(Path(metrics_path).read_text()).get("eval_prompt_shas")
    if used is None:
        return None, f"{metrics_path} does not list its prompts (an older eval-labeler wrote it): rerun cai eval-labeler"
    train = {sha256_text(text)[:16]: (pid, text) for text, pid in training_prompt_texts(lake).items()}
    both = sorted(set(used) & set(train))
    df = pd.DataFrame([{"prompt_id": train[h][0], "text": train[h][1]} for h in both], columns=["prompt_id", "text"])
    if not both:
        return df, f"none of the {len(used)} evaluation prompts is among the {len(train)} training prompts"
    shown = "; ".join(f"{pid[:12]} {text[:60]!r}" for pid, text in (train[h] for h in both[:3]))
    return df, (f"{len(both)} of the {len(used)} prompts the labeller was evaluated on are training prompts "
                f"({shown}{'; ...' if len(both) > 3 else ''}): rerun cai eval-labeler (it samples only prompts "
                "the lake does not train on), or re-ingest without them")


def label_summary(pairs: pd.DataFrame | None) -> pd.DataFrame | None:
    """One row: swap consistency of the AI labels with its 95% Wilson interval."""
    if pairs is None or pairs.empty:
        return None
    k, n = float(pairs["consistent"].sum()), len(pairs)
    lo, hi = wilson_interval(k, n)
    return pd.DataFrame([{"n": n, "swap_consistency": k / n, "swap_ci_low": lo, "swap_ci_high": hi}])


def injection_frame(prefs: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """One row per AI-labelled comparison (preference_dataset, source ai_harmless): does either
    response address the labeller (`addresses_evaluator`)? `injection` says which side and phrase."""
    ai = prefs[prefs["source"] == "ai_harmless"]
    if ai.empty:
        return None, "no AI-labelled comparisons in preference_dataset"
    found = [[(side, addresses_evaluator(text or "")) for side, text in (("A", a), ("B", b))]
             for a, b in zip(ai["response_a"], ai["response_b"])]
    phrases = ["; ".join(f"{side}: {hit!r}" for side, hit in sides if hit) or None for sides in found]
    df = pd.DataFrame({"pair_id": ai["pair_id"].to_numpy(), "injection": phrases,
                       "flagged": [p is not None for p in phrases]})
    hits = df[df["flagged"]]
    shown = "; ".join(f"{pid[:12]} {ph}" for pid, ph in zip(hits["pair_id"][:3], hits["injection"][:3]))
    return df, (f"{len(hits)} of {len(df)} AI-labelled comparisons have a response that addresses the labeller"
                + (f" ({shown}{'; ...' if len(hits) > 3 else ''})" if len(hits) else ""))


def review_frame(review_rows: list[dict], ai: pd.DataFrame, t) -> tuple[pd.DataFrame | None, str]:
    """One row: the AI labels' agreement with reviewers' A/B verdicts on the review queue's audit sample
    (cai_lib/review/dashboard.py agreement_figures, as `cai eval-labeler` reports it), over the verdicts on
    `ai` (the gate's non-quarantined AI labels); None (not judged) below `review_min_n` such verdicts."""
    ok = ai[ai["status"] == "ok"]
    f = agreement_figures(review_rows, ok[["event_id", "p_a"]].to_dict("records"))
    n, (lo, hi) = f["review_n"], f["review_agreement_ci"]
    beside = (f"; {f['review_tie']} ties and {f['review_both_bad']} both bad (not in n), "
              f"{f['review_set_aside']} on other labels set aside")
    if n < t.review_min_n:
        return None, f"{n} audit verdicts naming a side (< review_min_n {t.review_min_n}): not judged{beside}"
    principles = ", ".join(f"{p} {_fmt(v['agreement'])} (n={v['n']})" for p, v in f["review_by_principle"].items())
    return (pd.DataFrame([{"review_n": n, "review_agreement": f["review_agreement"], "review_ci_low": lo,
                           "review_ci_high": hi}]),
            f"AI labels vs {n} reviewers' audit verdicts: agreement {f['review_agreement']:.3f} [{lo:.3f}, {hi:.3f}]"
            f"{beside}; per principle: {principles}")


def label_frames(lake: Lake, t, bad) -> Frames:
    events = lake.read("label_events").to_pandas()
    labels = without_quarantined(events[events["kind"] != "eval_label"].reset_index(drop=True), "label_events", bad)
    ai = labels[labels["kind"].isin(AI_LABEL_KINDS)]
    cot = ai[ai["kind"] == "ai_label_cot"].reset_index(drop=True)
    ev, note = labeller_eval(t.eval_metrics, set(ai["model_fingerprint"].dropna()))
    if ev is not None and (ev["human_n"].iloc[0] or 0) < t.rate_min_n:
        ev, note = None, f"the evaluation has {ev['human_n'].iloc[0]} human pairs (< {t.rate_min_n}): not judged"
    valid = ai[ai["p_a"].between(0.0, 1.0) & ai["p_shown_a"].between(0.0, 1.0)]
    pairs = pair_consistency(valid) if len(valid) else None
    judged_pairs = pairs if pairs is not None and len(pairs) * 2 >= t.rate_min_n else None
    frames = {
        "label_events": labels,
        "label_rates": valid if len(valid) >= t.rate_min_n else None,
        "cot_labels": cot if len(cot) else None,
        "label_summary": label_summary(judged_pairs),
        "preference_dataset": _read(lake, "preference_dataset", "preference_dataset", bad),
        "labeller_eval": ev,
    }
    frames["label_injection"], injection_note = injection_frame(frames["preference_dataset"])
    frames["contamination"], contamination_note = contamination(t.eval_metrics, lake)
    frames["review_agreement"], review_note = review_frame(read_reviews(lake), ai, t)
    n_pairs = 0 if pairs is None else len(pairs)
    notes = {"labeller_eval": note, "contamination": contamination_note, "label_injection": injection_note,
             "review_agreement": review_note,
             "label_rates": (f"{len(valid)} AI labels, mean p_a {valid['p_a'].mean():.3f}, mean p_shown_a "
                             f"{valid['p_shown_a'].mean():.3f}, spread (std of p_a) {valid['p_a'].std():.3f}"
                             if frames["label_rates"] is not None else
                             f"{len(valid)} AI labels (< {t.rate_min_n}): rates over so few are noise, not judged"),
             "label_summary": (_swap_note(frames["label_summary"]) if frames["label_summary"] is not None
                               else f"{n_pairs} comparisons with both orders labelled (< {t.rate_min_n} labels): "
                                    "not judged"),
             "cot_labels": f"{len(cot)} chain-of-thought labels" if len(cot) else "no chain-of-thought labels"}
    return Frames(frames, notes)


def _swap_note(summary: pd.DataFrame) -> str:
    r = summary.iloc[0]
    return (f"{int(r['n'])} comparisons with both orders labelled, swap-consistent {r['swap_consistency']:.1%} "
            f"[95% {r['swap_ci_low']:.1%}, {r['swap_ci_high']:.1%}] (no position preference and no information: 50%)")


BUILDERS = {"prompts": prompt_frames, "sl": sl_frames, "labels": label_frames}


def build_frames(stage: str, lake: Lake, t) -> Frames:
    if stage not in BUILDERS:
        raise ValueError(f"unknown gate stage {stage!r}: choose one of {', '.join(BUILDERS)}")
    return BUILDERS[stage](lake, t, quarantined(lake))
