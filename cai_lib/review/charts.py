"""The dashboard's pictures: inline SVG strings from plain numbers. Pure functions, no JavaScript.

The app's Content-Security-Policy is `default-src 'none'` (no script, no image fetch): an SVG
element inside the page is markup, not a fetched resource, so it needs no policy of its own, and
its colours are presentation attributes (fill=, stroke=), not styles. Every text that comes from
the data (principle ids, stage names) is escaped here, since the template marks these strings safe.

    >>> scale(0.75, 0, 1, 100, 300)
    250.0
    >>> 'cx="250.0"' in interval_chart([{"label": "harm", "value": 0.75, "lo": 0.3, "hi": 0.95, "n": 4}],
    ...                                 title="t", left=100, plot=200)
    True
"""
from __future__ import annotations

from datetime import datetime
from html import escape

GOOD, MIXED, BAD, INK, GRID, MUTED = "#2e7d32", "#ef8f00", "#c62828", "#333", "#ddd", "#777"
ROW = 26          # px per row or lane
TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def scale(v: float, lo: float, hi: float, a: float, b: float) -> float:
    """v in [lo, hi] -> [a, b] (the middle when lo == hi), rounded to 0.1 px so the markup is stable."""
    return round(a + (b - a) / 2 if hi == lo else a + (v - lo) / (hi - lo) * (b - a), 1)


def _svg(width: float, height: float, title: str, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" font-family="sans-serif" '
            f'font-size="12"><title>{escape(title)}</title>' + "".join(body) + "</svg>")


def _text(x: float, y: float, s: str, anchor: str = "start", fill: str = INK, extra: str = "") -> str:
    return f'<text x="{x}" y="{y}" text-anchor="{anchor}" fill="{fill}"{extra}>{escape(s)}</text>'


def _axis01(x0: float, x1: float, top: float, bottom: float) -> list[str]:
    """Vertical grid lines and labels at 0, .25, .5, .75, 1 between x0 and x1."""
    out = []
    for t in TICKS:
        x = scale(t, 0, 1, x0, x1)
        out.append(f'<line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" stroke="{GRID}"/>')
        out.append(_text(x, bottom + 14, f"{t:g}", "middle", MUTED))
    return out


def interval_chart(rows: list[dict], *, title: str, left: int = 220, plot: int = 300) -> str:
    """One row per group: a dot at `value` and a whisker from `lo` to `hi` on a 0..1 axis, `n` beside it.
    rows: dicts with label, value (None: no data), lo, hi, n."""
    top, x0, x1 = 8, left, left + plot
    bottom = top + ROW * max(len(rows), 1)
    body = _axis01(x0, x1, top, bottom)
    for i, r in enumerate(rows):
        y = top + ROW * i + ROW / 2
        body.append(_text(x0 - 8, y + 4, r["label"], "end"))
        if r["value"] is None:
            body.append(_text(x1 + 8, y + 4, "n=0", fill=MUTED))
            continue
        lo, hi, v = (scale(r[k], 0, 1, x0, x1) for k in ("lo", "hi", "value"))
        body.append(f'<line x1="{lo}" y1="{y}" x2="{hi}" y2="{y}" stroke="{INK}" stroke-width="2"/>')
        body.append(f'<circle cx="{v}" cy="{y}" r="5" fill="{GOOD}"><title>{escape(r["label"])}: '
                    f'{r["value"]:.3f} [{r["lo"]:.3f}, {r["hi"]:.3f}], n={r["n"]}</title></circle>')
        body.append(_text(x1 + 8, y + 4, f'{r["value"]:.2f} (n={r["n"]})'))
    return _svg(x1 + 90, bottom + 22, title, body)


def calibration_chart(bins: list[dict], *, title: str, size: int = 260, margin: int = 44) -> str:
    """Reliability diagram: x = the AI's mean p in a bin, y = the reviewers' share of A there, with its
    Wilson interval; the dashed diagonal is perfect calibration; dot area grows with the bin's count."""
    x0, x1, y0, y1 = margin, margin + size, 8 + size, 8       # y grows downwards: y0 is p = 0
    body = _axis01(x0, x1, y1, y0)
    for t in TICKS:
        y = scale(t, 0, 1, y0, y1)
        body.append(f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="{GRID}"/>')
        body.append(_text(x0 - 6, y + 4, f"{t:g}", "end", MUTED))
    body.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="{MUTED}" stroke-dasharray="4 3"/>')
    for b in bins:
        x, y = scale(b["mean_prob"], 0, 1, x0, x1), scale(b["frac_positive"], 0, 1, y0, y1)
        lo, hi = (scale(c, 0, 1, y0, y1) for c in b["ci"])
        body.append(f'<line x1="{x}" y1="{lo}" x2="{x}" y2="{hi}" stroke="{INK}"/>')
        body.append(f'<circle cx="{x}" cy="{y}" r="{round(3 + 2 * b["count"] ** 0.5, 1)}" fill="{GOOD}" '
                    f'fill-opacity="0.7"><title>AI p in [{b["lo"]:g}, {b["hi"]:g}): mean {b["mean_prob"]:.3f}, '
                    f'reviewers A {b["frac_positive"]:.3f}, n={b["count"]}</title></circle>')
    body.append(_text((x0 + x1) / 2, y0 + 30, "AI P(A better), binned", "middle"))
    body.append(_text(12, (y0 + y1) / 2, "reviewers' share of A", "middle",
                      extra=f' transform="rotate(-90 12 {(y0 + y1) / 2})"'))
    return _svg(x1 + 12, y0 + 40, title, body)


COLOURS = {"passed": GOOD, "promoted": GOOD, "not_promotable": MIXED}   # anything else: BAD


def timeline_chart(timeline: dict[str, list], *, title: str, left: int = 110, plot: int = 430) -> str:
    """One lane per gate stage; a mark per verdict at its time (green passed, amber passed but not
    promotable, red failed / incomplete / refused); the first and last times label the axis."""
    points = [p for ps in timeline.values() for p in ps]
    top, x0, x1 = 8, left, left + plot
    bottom = top + ROW * max(len(timeline), 1)
    body = [f'<line x1="{x0}" y1="{bottom}" x2="{x1}" y2="{bottom}" stroke="{GRID}"/>']
    if points:
        t0, t1 = min(p.at for p in points), max(p.at for p in points)
        body += [_text(x0, bottom + 14, _when(t0), fill=MUTED), _text(x1, bottom + 14, _when(t1), "end", MUTED)]
    for i, (stage, ps) in enumerate(timeline.items()):
        y = top + ROW * i + ROW / 2
        body.append(_text(x0 - 8, y + 4, stage, "end"))
        body.append(f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="{GRID}"/>')
        for p in ps:
            x = scale(p.at.timestamp(), t0.timestamp(), t1.timestamp(), x0, x1)
            body.append(f'<circle cx="{x}" cy="{y}" r="6" fill="{COLOURS.get(p.verdict, BAD)}" '
                        f'data-verdict="{escape(p.verdict)}"><title>{escape(stage)}: {escape(p.verdict)} at '
                        f'{_when(p.at)}</title></circle>')
    return _svg(x1 + 20, bottom + 22, title, body)


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M")
