"""The review web app in process (Starlette's TestClient) on a small lake written with delta-spark:
the queue's order, a verdict mapped back to the pair's A/B, one row per form however often it is
posted, CSRF, escaped model text, tokens, and the loopback rule."""
from __future__ import annotations

import os
import re
import threading
from datetime import datetime, timezone

import pyarrow as pa
import pytest
from starlette.testclient import TestClient

from cai_lib.ids import stable_id
from cai_lib.lake.tables import Lake
from cai_lib.review.app import ReviewSettings, build_app
from cai_lib.review.queue import QueueRules, comparison_id
from cai_lib.review.store import ReviewStore
from cai_lib.review.verdicts import shown_order
from jobs.cli import main as cai
from jobs.review import check_host
from schemas import GATE_EVENTS, GENERATION_EVENTS, LABEL_EVENTS, PROMPTS
from tests.cdp import CHROMIUM, Browser
from tests.conftest import ROOT

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
CONST = {"constitution_id": "default", "constitution_sha": "c" * 64, "model_id": "m", "model_fingerprint": "f" * 16,
         "backend": "fake", "template_sha": "t" * 16}
EVIL = '<script>alert(1)</script> see [the answer](http://evil.example) ' + "<img src=x onerror=alert(2)>"
PAIRS = {"s": (0.9, 0.4), "n": (0.52, 0.5), "c": (0.9, 0.9)}   # swap-inconsistent, near 0.5, clear


def rows(pair: str, p_ab: float, p_ba: float) -> tuple[dict, list[dict], list[dict]]:
    pid = f"prompt-{pair}"
    prompt = {"prompt_id": pid, "text": f"Question {pair}?", "kind": "red_team", "source": "t", "source_row": 0,
              "source_format": "jsonl", "category": None, "tags": [], "split": "train", "meta": None, "created_at": NOW}
    gens = [{"event_id": f"{pair}-{s}", "kind": "pair_sample", "status": "ok", "target_event_id": f"{pair}-{s}",
             "attempt": 1, "prompt_id": pid, "parent_id": None, "round": r, "principle_id": None, **CONST,
             "sampling": "{}", "seed": 1, "text": EVIL if (pair, s) == ("s", "b") else f"Answer {s} to {pair}.",
             "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 1.0, "error": None,
             "job_run_id": "t", "created_at": NOW} for r, s in enumerate("ab")]
    labels = [{"event_id": stable_id("label", pair=pair, order=o), "kind": "ai_label", "status": "ok", "pair_id": pair,
               "prompt_id": pid, "response_a_id": f"{pair}-a", "response_b_id": f"{pair}-b", "order": o,
               "ensemble_index": 0, "principle_id": "harm", "logprob_shown_a": -1.0, "logprob_shown_b": -1.0,
               "p_shown_a": p if o == "ab" else 1 - p, "p_a": p, "cot_event_id": None, **CONST, "job_run_id": "t",
               "created_at": NOW} for o, p in (("ab", p_ab), ("ba", p_ba))]
    return prompt, gens, labels


def sl_rows(pair: str) -> list[dict]:
    """Pair s's prompt went through SL-CAI first: an answer, two critique -> revision rounds, one failed attempt."""
    steps = [("init", "initial_response", None, 0, None), ("c1", "critique", "init", 1, "harm"),
             ("r1", "revision", "c1", 1, "harm"), ("c2", "critique", "r1", 2, "honest"),
             ("r2", "revision", "c2", 2, "honest")]
    out = [{"event_id": f"{pair}-{e}", "kind": k, "status": "ok", "target_event_id": f"{pair}-{e}", "attempt": 1,
            "prompt_id": f"prompt-{pair}", "parent_id": parent and f"{pair}-{parent}", "round": r, "principle_id": pr,
            **CONST, "sampling": "{}", "seed": 1, "text": SL_TEXT.get(e, f"{k} {r} of {pair}"), "finish_reason": "stop",
            "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 1.0, "error": None, "job_run_id": "t",
            "created_at": NOW} for e, k, parent, r, pr in steps]
    failed = {**out[3], "event_id": f"{pair}-c2-failed", "status": "failed", "text": None, "error": "boom"}
    return out + [failed]


SL_TEXT = {"r1": "I revised it. <script>alert(3)</script>", "c1": "It is harmful & rude."}


def gate(stage: str, verdict: str, day: int) -> dict:
    """A gate_events row (the gates' verdicts the dashboard plots over time)."""
    return {"event_id": f"gate-{stage}-{day}", "kind": "gate_verdict", "stage": stage,
            "passed": verdict in ("passed", "not_promotable"), "verdict": verdict, "promotable": verdict == "passed",
            "incomplete_checks": [], "waived_checks": [], "promotion_blockers": [], "n_checks": 3,
            "n_failed": int(verdict == "failed"), "failed_checks": [], "failures": "{}", "n_quarantined": 0,
            "suite_sha": "s", "input_versions": "{}", "constitution_sha": None, "model_id": None, "docs_path": None,
            "job_run_id": "t", "created_at": datetime(2026, 1, day, tzinfo=timezone.utc)}


GATES = [gate("sl", "failed", 1), gate("sl", "passed", 2),
         {**gate("labels", "not_promotable", 3), "promotion_blockers": ["labels.review_agreement"],
          "n_failed": 1, "failed_checks": ["labels.review_agreement"]}]


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    return write_lake(spark, tmp_path_factory.mktemp("review") / "lake")


def write_lake(spark, root):
    """Three pairs' prompts, generations (pair s's prompt with an SL chain) and labels, and three gate verdicts."""
    root.mkdir()
    built = [rows(p, *ps) for p, ps in PAIRS.items()]
    for name, schema, part in (("prompts", PROMPTS, 0), ("generation_events", GENERATION_EVENTS, 1),
                               ("label_events", LABEL_EVENTS, 2)):   # one plain delta-spark commit each: inputs only
        table = pa.Table.from_pylist([r for b in built for r in ([b[0]] if part == 0 else b[part])]
                                     + (sl_rows("s") if part == 1 else []), schema=schema)
        spark.createDataFrame(table).write.format("delta").save(str(root / name))
    spark.createDataFrame(pa.Table.from_pylist(GATES, schema=GATE_EVENTS)).write.format("delta").save(
        str(root / "gate_events"))
    return root


def cid(pair: str) -> str:
    return comparison_id(pair, 0, "harm", CONST["constitution_sha"], CONST["model_fingerprint"], "ai_label")


def client(store: ReviewStore, reviewer: str | None = "ann", **kw) -> TestClient:
    settings = ReviewSettings(reviewer=reviewer, queue=QueueRules(audit_fraction=0.0), **kw)
    return TestClient(build_app(store, settings), base_url="http://127.0.0.1")


def form_of(html: str) -> dict:
    return {k: re.search(f'name="{k}" value="([^"]*)"', html).group(1) for k in ("csrf", "verdict_at")}


def queue_ids(c: TestClient) -> list[str]:
    return re.findall(r'data-comparison="([0-9a-f]+)"', c.get("/").text)


def review_rows(root) -> list[dict]:
    return Lake(root).read("review_events").to_pylist()


def test_queue_verdicts_csrf_and_escaping(spark, lake):
    store = ReviewStore(lake, spark)
    # two reviewers who see pair s in opposite orders, so both directions of the A/B mapping are checked
    ann, other = "ann", next(n for n in ("bob", "cy", "dee", "eve") if shown_order(n, cid("s")) != shown_order("ann", cid("s")))
    a, b = client(store, ann), client(store, other)
    assert queue_ids(a) == [cid("s"), cid("n")]

    page = a.get(f"/c/{cid('s')}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page and "<img" not in page
    assert 'href="http://evil' not in page and 'id="ai"' not in page          # no AI p before the verdict
    assert "default-src 'none'" in a.get("/").headers["content-security-policy"]

    refused = a.post(f"/c/{cid('s')}", data={"choice": "first", "verdict_at": form_of(page)["verdict_at"]})
    assert refused.status_code == 403 and review_rows(lake) == []

    forms = {n: form_of(c.get(f"/c/{cid('s')}").text) for n, c in ((ann, a), (other, b))}
    posts = [(a, {**forms[ann], "choice": "first"}), (a, {**forms[ann], "choice": "first"}),   # a double click
             (b, {**forms[other], "choice": "first", "note": "both fine, 1 clearer"})]         # the other, at once
    results = [None] * len(posts)
    threads = [threading.Thread(target=lambda i, c, d: results.__setitem__(i, c.post(f"/c/{cid('s')}", data=d,
                                                                                   follow_redirects=False)),
                                args=(i, c, d)) for i, (c, d) in enumerate(posts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [303, 303, 303]
    got = sorted((r["reviewer"], r["verdict"], r["shown_order"], r["note"], r["queue_reasons"]) for r in review_rows(lake))
    first_is = {"ab": "A", "ba": "B"}
    assert got == sorted([(ann, first_is[shown_order(ann, cid("s"))], shown_order(ann, cid("s")), None,
                           ["swap_inconsistent"]),
                          (other, first_is[shown_order(other, cid("s"))], shown_order(other, cid("s")),
                           "both fine, 1 clearer", ["swap_inconsistent"])])

    after = a.get(f"/c/{cid('s')}").text       # now the AI's p in both orders
    assert re.findall(r"<td>(\d\.\d{3})</td>", after) == ["0.900", "0.900", "0.600", "0.400", "0.650"]
    assert queue_ids(a) == [cid("n")]          # what ann judged leaves her queue

    dash = a.get("/dashboard")                 # the figures of this lake (cai_lib/review/dashboard.py's tests: the maths)
    assert dash.status_code == 200 and dash.headers["content-security-policy"].startswith("default-src 'none';")
    assert dash.text.count("<svg") == 4 and "<script" not in dash.text
    assert "no verdicts on audit items yet" in dash.text          # both verdicts were on doubtful items, none audited
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", dash.text)
    assert cells[cells.index("[0.6, 0.8)"):][:5] == ["[0.6, 0.8)", "0.650", "0.500", "[0.095, 0.905]", "2"]   # A and B
    assert cells[cells.index("0.667"):][:4] == ["0.667", "[0.208, 0.939]", "3", "0"]   # swap-consistent: n, c of s, n, c
    assert cells[cells.index("sl"):][:6] == ["sl", "2", "1", "1", "passed 2026-01-02 00:00", "none"]
    assert cells[cells.index("labels"):][:6] == ["labels", "1", "1", "0", "not_promotable 2026-01-03 00:00",
                                                 "labels.review_agreement"]
    assert [(v, c) for c, v in re.findall(r'fill="(#[0-9a-f]+)" data-verdict="(\w+)"', dash.text)] == [
        ("not_promotable", "#ef8f00"), ("failed", "#c62828"), ("passed", "#2e7d32")]


def test_the_sl_chain_page_shows_each_round_with_model_text_inert(lake):
    c = client(ReviewStore(lake))
    assert 'href="/sl/prompt-s" id="sl-link"' in c.get(f"/c/{cid('s')}").text     # from the comparison's prompt
    page = c.get("/sl/prompt-s")
    assert page.status_code == 200 and "<script>" not in page.text
    assert "1 SL-CAI chain in generation_events; 1 failed attempt not shown." in page.text
    steps = re.findall(r'<pre class="step" data-kind="(\w+)"(?: data-round="(\d)")?>([^<]*)</pre>', page.text)
    assert steps == [("initial_response", "", "initial_response 0 of s"), ("critique", "1", "It is harmful &amp; rude."),
                     ("revision", "1", "I revised it. &lt;script&gt;alert(3)&lt;/script&gt;"),
                     ("critique", "2", "critique 2 of s"), ("revision", "2", "revision 2 of s")]
    assert re.findall(r"Round (\d) · principle <code>(\w+)</code>", page.text) == [("1", "harm"), ("2", "honest")]
    assert c.get("/sl/prompt-none").status_code == 404 and c.get("/sl/" + "x" * 300).status_code == 404


def test_tokens_name_the_reviewer_and_every_post_needs_the_csrf_token(lake):
    store = ReviewStore(lake)
    c = client(store, None, tokens={"ann": "a" * 20, "bob": "b" * 20})
    assert c.get("/", follow_redirects=False).headers["location"] == "/login"
    csrf = re.search('name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    assert c.post("/login", data={"token": "b" * 20}).status_code == 403
    assert c.post("/login", data={"token": "x" * 20, "csrf": csrf}).status_code == 401
    assert "reviewer: <b>bob</b>" in c.post("/login", data={"token": "b" * 20, "csrf": csrf}).text
    assert TestClient(c.app, base_url="http://evil.example").get("/").status_code == 400   # DNS rebinding


def test_beyond_loopback_only_with_tokens(lake, tmp_path, capsys):
    assert cai(["review", "serve", "--lake", str(lake), "--host", "0.0.0.0"]) == 1
    assert capsys.readouterr().err.startswith("cai review: error: cai review serve --host 0.0.0.0 listens beyond "
                                              "loopback")
    assert check_host("127.0.0.1", None) == ("127.0.0.1", "localhost", "127.0.0.1")
    assert check_host("0.0.0.0", {"ann": "a" * 20}) == ("*",)
    short = tmp_path / "tokens.yaml"
    short.write_text("ann: short\n")
    assert cai(["review", "serve", "--lake", str(lake), "--host", "0.0.0.0", "--tokens", str(short)]) == 1
    assert "reviewer 'ann' needs a token of at least 16 characters" in capsys.readouterr().err


@pytest.fixture
def served(spark, lake):
    """The app under a real uvicorn server on a free loopback port, for a browser; every comparison is in
    the audit sample, so the reviewer's verdicts count in the dashboard's agreement."""
    import uvicorn
    store = ReviewStore(lake, spark)
    server = uvicorn.Server(uvicorn.Config(build_app(store, ReviewSettings(reviewer="zed", queue=QueueRules(audit_fraction=1.0))),
                                           host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def shots(tmp_path) -> list:
    """Where screenshots go: the test's tmp dir, and docs/img too when CAI_DOCS_SCREENSHOTS=1 (how the
    pictures in docs/review.md were made; a plain test run leaves the tracked files alone)."""
    return [tmp_path] + ([ROOT / "docs" / "img"] if os.environ.get("CAI_DOCS_SCREENSHOTS") == "1" else [])


AGREEMENT_CELLS = "[...document.querySelectorAll('tr.agreement-row td')].map(td => td.textContent.trim())"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: `make browser` installs it")
def test_a_reviewer_in_headless_chromium_judges_with_the_mouse_and_the_keyboard(served, lake, tmp_path):
    zed_s = {"ab": "B", "ba": "A"}[shown_order("zed", cid("s"))]      # "second" on s, as stored
    with Browser() as b:
        b.open(served + "/")
        assert b.js("[...document.querySelectorAll('tr.item')].map(r => r.dataset.comparison)") == [
            cid("s"), cid("n"), cid("c")]
        for folder in shots(tmp_path):
            assert b.screenshot(folder / "review_queue.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        b.click("#to-dashboard")
        assert b.js(AGREEMENT_CELLS) == [] and b.js("document.querySelectorAll('svg').length") == 4
        b.open(served + "/")
        b.click(f"a[href='/c/{cid('s')}']")
        assert b.js("document.querySelector('#second, #first') && document.scripts.length") == 0   # EVIL stayed text
        b.click("button[value=second]")                       # the mouse
        assert b.js("document.querySelector('#your-verdict').textContent") == zed_s
        b.screenshot(tmp_path / "verdict.png")
        b.open(f"{served}/c/{cid('n')}")
        b.press_enter("button[value=tie]")                    # the keyboard
        assert b.js("document.querySelector('#your-verdict').textContent") == "tie"
        b.open(served + "/")
        assert b.js("document.querySelector('#total').textContent") == "1 comparisons to review."
        b.click("#to-dashboard")                              # the audit verdicts are in: s agrees when zed said A
        agree = zed_s == "A"                                  # the AI's p on s is 0.65: A
        assert b.js(AGREEMENT_CELLS) == ["harm", "default " + "c" * 12, "1.000" if agree else "0.000",
                                         "[0.207, 1.000]" if agree else "[0.000, 0.793]", "1", "1", "0"]
        assert b.js("document.querySelectorAll('#agreement svg circle').length") == 1
        assert b.js("document.scripts.length") == 0
        for folder in shots(tmp_path):
            b.screenshot(folder / "review_dashboard.png", full_page=True)
    mine = sorted((r["pair_id"], r["verdict"], r["queue_reasons"]) for r in review_rows(lake) if r["reviewer"] == "zed")
    assert mine == [("n", "tie", ["near_half", "audit"]), ("s", zed_s, ["swap_inconsistent", "audit"])]
