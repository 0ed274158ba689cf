"""The dashboard's figures on known rows (pure: no Spark, no lake) and the SVG they draw."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from cai_lib.review import charts
from cai_lib.review.dashboard import (GatePoint, agreement, ai_p, calibration, gate_timeline, latest_verdicts, review,
                                      swap_consistency)
from cai_lib.review.queue import comparisons, label

SHA2 = "d" * 64


def label_p(rows: list[dict]) -> dict[str, float]:
    return {e: p for r in rows for e, p in r["_p"].items()}


def test_agreement_is_three_of_four_on_the_audit_sample_with_its_wilson_interval():
    rows = [review("c1", "A", 0.9), review("c2", "A", 0.8), review("c3", "B", 0.7), review("c4", "B", 0.2),
            review("c5", "B", 0.9, reasons=("swap_inconsistent",)),        # not audited: left out entirely
            review("c6", "A", 0.9, reasons=("near_half", "audit"))]        # audited, whatever else it is
    [a] = agreement(rows[:4], label_p(rows))
    assert (a.principle_id, a.constitution_sha, a.successes, a.n, a.value) == ("harm", "c" * 64, 3.0, 4, 0.75)
    assert [round(x, 6) for x in a.interval] == [0.300642, 0.954413]
    assert a.left_out == (("both_bad", 0), ("tie", 0))
    [b] = agreement(rows, label_p(rows))
    assert (b.successes, b.n) == (4.0, 5)


def test_ties_and_both_bad_are_counted_apart_and_an_undecided_ai_counts_half():
    rows = [review("c1", "A", 0.9), review("c2", "tie", 0.9), review("c3", "both_bad", 0.1),
            review("c4", "both_bad", 0.6), review("c5", "B", 0.5)]
    [a] = agreement(rows, label_p(rows))
    assert (a.successes, a.n, a.value, a.left_out) == (1.5, 2, 0.75, (("both_bad", 2), ("tie", 1)))
    only_ties = [review("c2", "tie", 0.9)]
    [t] = agreement(only_ties, label_p(only_ties))
    assert (t.n, t.value, t.interval, t.left_out) == (0, None, (0.0, 1.0), (("both_bad", 0), ("tie", 1)))


def test_a_reviewers_latest_verdict_stands_and_groups_are_principle_and_constitution():
    rows = [review("c1", "B", 0.9, at=1), review("c1", "A", 0.9, at=2),          # ann changed her mind: agrees now
            review("c1", "B", 0.9, reviewer="bob"),                              # bob's own verdict counts too
            review("c2", "A", 0.8, principle="honest"), review("c3", "A", 0.2, sha=SHA2)]
    assert [(r["reviewer"], r["verdict"]) for r in latest_verdicts(rows) if r["comparison_id"] == "c1"] == [
        ("ann", "A"), ("bob", "B")]
    got = [(a.principle_id, a.constitution_sha[:1], a.successes, a.n) for a in agreement(rows, label_p(rows))]
    assert got == [("harm", "c", 1.0, 2), ("harm", "d", 0.0, 1), ("honest", "c", 1.0, 1)]


def test_the_ai_p_of_a_verdict_is_the_mean_of_the_labels_it_judged_and_a_missing_label_is_an_error():
    row = {**review("c1", "A", 0.9), "label_event_ids": ["x", "y"]}
    assert ai_p(row, {"x": 0.9, "y": 0.4}) == 0.65
    with pytest.raises(ValueError, match=r"review_events r-ann-c1-0: label_events lacks \['y'\]"):
        ai_p(row, {"x": 0.9})


def test_swap_consistency_per_principle_leaves_single_orders_out():
    rows = [label("p1", "ab", 0.9), label("p1", "ba", 0.8),          # consistent
            label("p2", "ab", 0.9), label("p2", "ba", 0.3),          # inconsistent
            label("p3", "ab", 0.5), label("p3", "ba", 0.1),          # 0.5 agrees with either side
            label("p4", "ab", 0.7),                                  # one order: not in n
            label("p5", "ab", 0.2, principle="honest"), label("p5", "ba", 0.9, principle="honest")]
    got = [(r.principle_id, r.successes, r.n, r.left_out) for r in swap_consistency(comparisons(rows))]
    assert got == [("harm", 2.0, 3, (("one_order", 1),)), ("honest", 0.0, 1, (("one_order", 0),))]
    assert [round(x, 6) for x in swap_consistency(comparisons(rows))[0].interval] == [0.207660, 0.938508]


def test_calibration_bins_the_ai_p_against_the_reviewers_share_of_a():
    rows = [review("c1", "A", 0.9, reasons=("near_half",)), review("c2", "A", 0.85), review("c3", "B", 0.95),
            review("c4", "B", 0.1), review("c5", "tie", 0.5), review("c6", "A", 0.45)]
    got = calibration(rows, label_p(rows), bins=5)
    assert got["left_out"] == 1
    assert [(b["lo"], b["hi"], round(b["mean_prob"], 6), round(b["frac_positive"], 6), b["count"])
            for b in got["bins"]] == [(0.0, 0.2, 0.1, 0.0, 1), (0.4, 0.6, 0.45, 1.0, 1), (0.8, 1.0, 0.9, 0.666667, 3)]
    assert [round(x, 6) for x in got["bins"][2]["ci"]] == [0.207660, 0.938508]
    assert calibration([], {}) == {"bins": [], "left_out": 0}


def test_gate_timeline_orders_each_stage_by_time_and_names_a_missing_verdict_word():
    t = [datetime(2026, 1, d, tzinfo=timezone.utc) for d in (1, 2, 3)]
    rows = [{"event_id": "g2", "stage": "sl", "passed": False, "verdict": "failed", "created_at": t[1]},
            {"event_id": "g1", "stage": "sl", "passed": True, "verdict": None, "created_at": t[0]},
            {"event_id": "g3", "stage": "labels", "passed": True, "verdict": "not_promotable", "created_at": t[2],
             "failed_checks": ["labels.review_agreement"], "incomplete_checks": ["labels.calibration"]}]
    assert gate_timeline(rows) == {"labels": [GatePoint("labels", t[2], True, "not_promotable", "g3",
                                                        ("labels.calibration", "labels.review_agreement"))],
                                   "sl": [GatePoint("sl", t[0], True, "passed", "g1"),
                                          GatePoint("sl", t[1], False, "failed", "g2")]}


def test_interval_chart_puts_the_dot_and_whisker_where_the_numbers_are_and_escapes_labels():
    svg = charts.interval_chart([{"label": "<script>x</script>", "value": 0.75, "lo": 0.300642, "hi": 0.954413,
                                  "n": 4}, {"label": "empty", "value": None, "lo": 0.0, "hi": 1.0, "n": 0}],
                                title="agreement", left=100, plot=200)
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg" width="390" height="82"')
    assert '<circle cx="250.0" cy="21.0" r="5"' in svg
    assert '<line x1="160.1" y1="21.0" x2="290.9" y2="21.0"' in svg
    assert "&lt;script&gt;x&lt;/script&gt;" in svg and "<script" not in svg
    assert ">0.75 (n=4)</text>" in svg and ">n=0</text>" in svg


def test_calibration_and_timeline_charts():
    svg = charts.calibration_chart([{"lo": 0.8, "hi": 1.0, "mean_prob": 0.9, "frac_positive": 0.5, "count": 4,
                                     "ci": (0.15, 0.85)}], title="calibration", size=200, margin=40)
    assert '<circle cx="220.0" cy="108.0" r="7.0"' in svg                 # x = 40 + 0.9 * 200, y = 208 - 0.5 * 200
    assert '<line x1="220.0" y1="178.0" x2="220.0" y2="38.0"' in svg       # the interval, 0.15 .. 0.85
    t = [datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 3, tzinfo=timezone.utc)]
    timeline = {"sl": [GatePoint("sl", t[0], True, "passed", "a"), GatePoint("sl", t[1], False, "failed", "b")],
                "labels": [GatePoint("labels", t[1], True, "not_promotable", "c")]}
    svg = charts.timeline_chart(timeline, title="gates", left=100, plot=400)
    assert f'<circle cx="100.0" cy="21.0" r="6" fill="{charts.GOOD}" data-verdict="passed">' in svg
    assert f'<circle cx="500.0" cy="21.0" r="6" fill="{charts.BAD}" data-verdict="failed">' in svg
    assert f'<circle cx="500.0" cy="47.0" r="6" fill="{charts.MIXED}" data-verdict="not_promotable">' in svg
    assert ">2026-01-01 00:00</text>" in svg and ">2026-01-03 00:00</text>" in svg
    assert charts.timeline_chart({}, title="none").count("<circle") == 0
