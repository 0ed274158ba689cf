"""The review web app (Starlette, server-rendered Jinja templates): the queue, one comparison, a verdict,
the dashboard (/dashboard: agreement on the audit sample, swap consistency, calibration, gate verdicts),
and a prompt's SL-CAI chain (/sl/PROMPT_ID: first answer, critique -> revision per round).

    cai review serve --lake lake                       # http://127.0.0.1:8765, reviewer = your user name
    cai review serve --lake lake --host 0.0.0.0 --tokens reviewers.yaml   # beyond loopback: a token each

Model output is untrusted: every text goes through Jinja's autoescape into a <pre> (no markdown,
no links), and the Content-Security-Policy allows no script, frame or form target elsewhere.
Every POST carries the session's CSRF token; the Host header must be one this server answers as
(DNS rebinding). The page shows the two responses in an order drawn per reviewer and comparison
(verdicts.shown_order) and the AI's p only after the reviewer's own verdict, so neither the page
nor the AI leans on the reviewer.
"""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from cai_lib.review import charts, dashboard
from cai_lib.review.chains import chains
from cai_lib.review.queue import QueueItem, QueueRules, rank
from cai_lib.review.store import ReviewStore
from cai_lib.review.verdicts import CHOICES, review_row, shown_order

TEMPLATES = Path(__file__).parent / "templates"
MAX_FORM_BYTES = 16_384          # a verdict and a note; anything bigger is not a form of ours
MAX_NOTE_CHARS = 4_000
MAX_ID_CHARS = 200               # a prompt id in a URL (ours are 64 hex characters)
QUEUE_PAGE = 100                 # items listed on the queue page
HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                      "frame-ancestors 'none'; base-uri 'none'",
           "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}


@dataclass
class ReviewSettings:
    reviewer: str | None = None              # who reviews on loopback without tokens
    tokens: dict[str, str] | None = None     # reviewer -> token: every page then needs a login
    queue: QueueRules = QueueRules()         # doubt, the audit sample's share and seed, its spacing
    principle_texts: dict[tuple[str, str], str] = field(default_factory=dict)   # (constitution sha, id) -> text
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    session_secret: str = field(default_factory=lambda: secrets.token_hex(32))


class Forbidden(Exception):
    """A POST without the session's CSRF token."""


def build_app(store: ReviewStore, settings: ReviewSettings) -> Starlette:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True)   # autoescape: model text is untrusted

    def page(name: str, request: Request, status: int = 200, **context) -> HTMLResponse:
        html = env.get_template(name).render(csrf=csrf_token(request), reviewer=reviewer_of(request, settings),
                                             **context)
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    async def queue_page(request: Request) -> Response:
        reviewer = reviewer_of(request, settings)
        if reviewer is None:
            return RedirectResponse("/login", 303)
        principle, constitution = (request.query_params.get(k) or None for k in ("principle", "constitution"))
        items = await run_in_threadpool(queue_for, store, settings, reviewer, principle, constitution)
        comps = store.comparisons()
        return page("queue.html", request, items=items[:QUEUE_PAGE], total=len(items), principle=principle or "",
                    constitution=constitution or "", principles=sorted({c.principle_id for c in comps}),
                    constitutions=sorted({c.constitution_id for c in comps}))

    async def comparison_page(request: Request) -> Response:
        reviewer = reviewer_of(request, settings)
        if reviewer is None:
            return RedirectResponse("/login", 303)
        c = store.comparison(request.path_params["cid"])
        if c is None:
            return page("message.html", request, 404, message="No such comparison in this lake's label_events.")
        if request.method == "POST":
            return await post_verdict(request, reviewer, c)
        return page("comparison.html", request, **await run_in_threadpool(comparison_context, store, settings,
                                                                           reviewer, c))

    async def post_verdict(request: Request, reviewer: str, c) -> Response:
        form = await read_form(request)
        choice, note = form.get("choice", ""), form.get("note", "")
        verdict_at = parse_time(form.get("verdict_at", ""))
        if choice not in CHOICES or verdict_at is None or len(note) > MAX_NOTE_CHARS:
            return page("message.html", request, 400, message=f"A verdict needs choice in {CHOICES}, the form's "
                        f"verdict_at and a note of at most {MAX_NOTE_CHARS} characters: reload the page and retry.")
        reasons = next((i.reasons for i in queue_for(store, settings, None, None, None)
                        if i.comparison.comparison_id == c.comparison_id), ())
        row = review_row(c, reasons, reviewer=reviewer, choice=choice, note=note, verdict_at=verdict_at,
                         now=datetime.now(timezone.utc))
        await run_in_threadpool(store.append, row)
        return RedirectResponse(f"/c/{c.comparison_id}", 303)

    async def dashboard_page(request: Request) -> Response:
        if reviewer_of(request, settings) is None:
            return RedirectResponse("/login", 303)
        return page("dashboard.html", request, **await run_in_threadpool(dashboard_context, store))

    async def sl_page(request: Request) -> Response:
        if reviewer_of(request, settings) is None:
            return RedirectResponse("/login", 303)
        prompt_id = request.path_params["prompt_id"]
        prompt = store.prompt(prompt_id) if len(prompt_id) <= MAX_ID_CHARS else None
        if prompt is None:
            return page("message.html", request, 404, message="No such prompt in this lake's prompts table.")
        found, failed = await run_in_threadpool(lambda: chains(store.generations(prompt_id)))
        return page("sl.html", request, prompt=prompt, chains=found, failed=failed)

    async def login(request: Request) -> Response:
        if settings.tokens is None:
            return RedirectResponse("/", 303)
        if request.method == "POST":
            form = await read_form(request)
            who = token_owner(form.get("token", ""), settings.tokens)
            if who is None:
                return page("login.html", request, 401, error="Unknown token.")
            request.session["reviewer"] = who
            return RedirectResponse("/", 303)
        return page("login.html", request, error=None)

    async def forbidden(request: Request, exc: Exception) -> Response:
        return page("message.html", request, 403, message="This form's CSRF token is missing or stale: reload the "
                    "page and submit it again.")

    routes = [Route("/", queue_page), Route("/c/{cid}", comparison_page, methods=["GET", "POST"]),
              Route("/dashboard", dashboard_page), Route("/sl/{prompt_id}", sl_page), Route("/login", login, methods=["GET", "POST"])]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts)),
                  Middleware(SessionMiddleware, secret_key=settings.session_secret, same_site="strict",
                             session_cookie="cai_review")]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={Forbidden: forbidden})


def queue_for(store: ReviewStore, settings: ReviewSettings, reviewer: str | None, principle: str | None,
              constitution: str | None) -> list[QueueItem]:
    """The ranked queue (without what `reviewer` judged already; None: everything, for a verdict's reasons)."""
    reviewed = store.reviewed(reviewer) if reviewer else set()
    return rank(store.comparisons(), settings.queue, principle=principle, constitution=constitution, reviewed=reviewed,
                flagged=store.flagged_responses())


def comparison_context(store: ReviewStore, settings: ReviewSettings, reviewer: str, c) -> dict:
    """What comparison.html shows: the texts in this reviewer's order; the AI's p once they gave a verdict."""
    prompt, texts = store.texts(c)
    order = shown_order(reviewer, c.comparison_id)
    ids = (c.response_a_id, c.response_b_id) if order == "ab" else (c.response_b_id, c.response_a_id)
    verdict = store.latest_verdict(reviewer, c.comparison_id)
    principle = settings.principle_texts.get((c.constitution_sha, c.principle_id))
    return {"c": c, "prompt": prompt, "first": texts[ids[0]], "second": texts[ids[1]], "order": order,
            "principle_text": principle, "verdict": verdict, "choices": CHOICES,
            "labels": store.label_rows(c) if verdict else None,
            "verdict_at": datetime.now(timezone.utc).isoformat()}


def dashboard_context(store: ReviewStore) -> dict:
    """What dashboard.html shows: the figures (cai_lib.review.dashboard) as tables and inline SVG charts."""
    comps, verdicts, label_p = store.comparisons(), store.all_verdicts(), store.label_p()
    names = {c.constitution_sha: c.constitution_id for c in comps}

    def rows(rates: list[dashboard.Rate]) -> list[dict]:
        return [{"label": f"{r.principle_id} · {names.get(r.constitution_sha, '?')} {r.constitution_sha[:8]}",
                 "principle": r.principle_id, "constitution": names.get(r.constitution_sha, "?"),
                 "sha": r.constitution_sha[:12], "value": r.value, "lo": r.interval[0], "hi": r.interval[1],
                 "n": r.n, "left_out": dict(r.left_out)} for r in rates]

    agree, swap = rows(dashboard.agreement(verdicts, label_p)), rows(dashboard.swap_consistency(comps))
    calib, timeline = dashboard.calibration(verdicts, label_p), dashboard.gate_timeline(store.gate_events())
    return {"agreement": agree, "swap": swap, "calibration": calib, "timeline": timeline, "n_verdicts": len(verdicts),
            "agreement_svg": Markup(charts.interval_chart(agree, title="agreement with reviewers (audit sample)")),
            "swap_svg": Markup(charts.interval_chart(swap, title="swap consistency of the AI labels")),
            "calibration_svg": Markup(charts.calibration_chart(calib["bins"], title="calibration")),
            "timeline_svg": Markup(charts.timeline_chart(timeline, title="gate verdicts over time"))}


def reviewer_of(request: Request, settings: ReviewSettings) -> str | None:
    if settings.tokens is None:
        return settings.reviewer
    who = request.session.get("reviewer")
    return who if who in settings.tokens else None


def token_owner(token: str, tokens: dict[str, str]) -> str | None:
    """The reviewer whose token this is (compared in constant time, every token checked)."""
    owner = None
    for name, expected in tokens.items():
        if hmac.compare_digest(token.encode(), expected.encode()):
            owner = name
    return owner


def csrf_token(request: Request) -> str:
    if "csrf" not in request.session:
        request.session["csrf"] = secrets.token_urlsafe(32)
    return request.session["csrf"]


async def read_form(request: Request) -> dict[str, str]:
    """A url-encoded form's fields (first value each), after checking the session's CSRF token."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES or request.headers.get("content-type", "").split(";")[0] != \
            "application/x-www-form-urlencoded":
        raise Forbidden()
    form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
    expected = request.session.get("csrf")
    if not expected or not hmac.compare_digest(form.get("csrf", "").encode(), expected.encode()):
        raise Forbidden()
    return form


def parse_time(text: str) -> datetime | None:
    """The form's verdict_at: a UTC time this server issued (not in the future); None when it is not one."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    if t.tzinfo is None or t.utcoffset() != timedelta(0) or t > datetime.now(timezone.utc) + timedelta(seconds=5):
        return None
    return t
