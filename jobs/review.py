"""`cai review`: people review the AI comparisons the labels leave in doubt; verdicts land in review_events.

    cai review serve --lake lake                           # http://127.0.0.1:8765, reviewer = $USER
    cai review serve --lake lake --reviewer ann --port 9000
    cai review serve --lake lake --host 0.0.0.0 --tokens reviewers.yaml    # a team: `ann: <token>` per line
    cai review export --lake lake --format label-studio --out tasks.json   # + tasks.label_config.xml
    cai review export --lake lake --format argilla --out records.json
    cai review import --lake lake --format label-studio export.json --reviewer-field completed_by.email
    cai review import --lake lake --format argilla records.json --reviewer-field user_id
    cai review pointer --lake lake --pointer pointers/reviews.json         # dvc's `reviews` stage

Loopback by default. Any other --host is refused unless --tokens names a YAML mapping reviewer -> token
(each at least 16 characters, all different): then every page asks for a token and the reviewer is
who it belongs to. Put TLS in front (a reverse proxy) when the network is not trusted: the session
cookie travels in the clear otherwise. Verdicts are written with delta-spark (a local Spark session
starts with the server); everything else is read with delta-rs.

export writes the whole queue (everyone's, nothing left out for a reviewer) in Label Studio's or
Argilla's task format; import reads their annotations back (cai_lib/review/exchange.py says how),
checks every row before Spark starts, and inserts the verdicts review_events lacks: a second import
of one file adds nothing.

pointer writes review_events' version and row count (read with delta-rs, no Spark) to a pointer file:
dvc.yaml's `reviews` stage runs it on every `dvc repro` (always_changed), so the stages that read the
verdicts (label under `reviewed_verdicts: prefer`, eval-labeler's agreement, the labels gate) rerun when
verdicts arrived since, and only then.
"""
from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
from datetime import datetime, timezone
from pathlib import Path

from cai_lib.files import write_json
from cai_lib.review.app import ReviewSettings, build_app, queue_for
from cai_lib.review.exchange import (DEFAULT_REVIEWER_FIELD, FORMATS, LABEL_STUDIO_CONFIG, export_tasks, new_rows,
                                     read_annotations, review_rows)
from cai_lib.review.queue import QueueRules
from cai_lib.review.store import ReviewStore

MIN_TOKEN_CHARS = 16


class ReviewConfigError(ValueError):
    """A review server setting that would be unsafe or cannot work; nothing was started."""


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (a name other than localhost may resolve to anything).

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:   # a host name: it may resolve to anything
        return False


def read_tokens(path: str | None) -> dict[str, str] | None:
    """reviewer -> token from a YAML mapping file; None without a file."""
    if path is None:
        return None
    import yaml
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not data:
        raise ReviewConfigError(f"tokens file {path} must be a YAML mapping `reviewer: token`, one per reviewer")
    for name, token in data.items():
        if not isinstance(name, str) or not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise ReviewConfigError(f"tokens file {path}: reviewer {name!r} needs a token of at least "
                                    f"{MIN_TOKEN_CHARS} characters (e.g. `python -c 'import secrets; "
                                    "print(secrets.token_urlsafe(24))'`)")
    if len(set(data.values())) < len(data):
        raise ReviewConfigError(f"tokens file {path}: two reviewers share a token; give each their own")
    return data


def check_host(host: str, tokens: dict[str, str] | None) -> tuple[str, ...]:
    """The Host headers the server answers to; refuses a non-loopback host without tokens."""
    if is_loopback(host):
        return ("127.0.0.1", "localhost", host)
    if tokens is None:
        raise ReviewConfigError(f"cai review serve --host {host} listens beyond loopback, where anyone who reaches "
                                "the port could read the data and post verdicts. Fix: pass --tokens FILE (a token "
                                "per reviewer) or keep the default --host 127.0.0.1")
    return ("*",)


def principle_texts(files: list[str]) -> dict[tuple[str, str], str]:
    """(constitution sha, principle id) -> comparison principle text, for the constitutions given."""
    from cai_lib.constitution.load import load_constitution
    out = {}
    for f in files:
        c = load_constitution(f)
        out.update({(c.sha256, p.id): p.text for p in c.comparison})
    return out


def constitution_files(a: argparse.Namespace) -> list[str]:
    return a.constitution if a.constitution is not None else sorted(map(str, Path("constitutions").glob("*.yaml")))


def settings_of(a: argparse.Namespace) -> ReviewSettings:
    tokens = read_tokens(a.tokens)
    hosts = check_host(a.host, tokens)
    return ReviewSettings(reviewer=a.reviewer or getpass.getuser(), tokens=tokens, queue=queue_rules(a),
                          principle_texts=principle_texts(constitution_files(a)), allowed_hosts=hosts)


def queue_rules(a: argparse.Namespace) -> QueueRules:
    return QueueRules(near=a.near, audit_fraction=a.audit_fraction, seed=a.seed, audit_every=a.audit_every)


def queue_flags(p: argparse.ArgumentParser) -> None:
    """What decides the queue: the same for the web app and an export."""
    p.add_argument("--lake", default="lake", help="the lake folder (default: lake)")
    p.add_argument("--constitution", action="append", default=None,
                   help="a constitution file whose principle texts to show (repeatable; default: constitutions/*.yaml)")
    p.add_argument("--seed", type=int, default=0, help="seed of the audit sample")
    p.add_argument("--near", type=float, default=0.1, help="queue labels with |p - 0.5| <= this")
    p.add_argument("--audit-fraction", type=float, default=0.1, help="share of all comparisons in the audit sample")
    p.add_argument("--audit-every", type=int, default=4, help="one audit item after this many doubtful ones")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cai review", description="People review the AI labels in doubt.")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("serve", help="the review web app (queue, comparison pages, verdicts -> review_events)")
    queue_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--reviewer", default=None, help="your name in review_events (default: your user name); "
                   "ignored with --tokens, where the token says who")
    s.add_argument("--tokens", default=None, help="YAML mapping reviewer -> token; required beyond loopback")
    s.add_argument("--master", default="local[1]", help="Spark master of the session that writes verdicts")
    e = sub.add_parser("export", help="the whole queue as Label Studio tasks or an Argilla records file")
    queue_flags(e)
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("--out", required=True, help="the JSON file to write (Label Studio: its labeling config too, "
                   "as OUT's name with .label_config.xml)")
    i = sub.add_parser("import", help="Label Studio / Argilla annotations of an export -> review_events")
    i.add_argument("file", help="the tool's JSON export of the annotated tasks / records")
    i.add_argument("--lake", default="lake", help="the lake folder (default: lake)")
    i.add_argument("--format", required=True, choices=FORMATS)
    i.add_argument("--reviewer-field", default=None, help="dotted path to the reviewer's name in an annotation "
                   f"(Label Studio, default {DEFAULT_REVIEWER_FIELD['label-studio']}) or a response (Argilla, "
                   f"default {DEFAULT_REVIEWER_FIELD['argilla']})")
    i.add_argument("--master", default="local[1]", help="Spark master of the session that writes verdicts")
    t = sub.add_parser("pointer", help="review_events' version and rows -> a pointer file (dvc's `reviews` stage)")
    t.add_argument("--lake", default="lake", help="the lake folder (default: lake)")
    t.add_argument("--pointer", required=True, help="the JSON file to write")
    return p


def review_main(argv=None) -> int:
    a = parser().parse_args(argv)
    return {"serve": serve, "export": export, "import": import_file, "pointer": pointer}[a.action](a)


def pointer(a: argparse.Namespace) -> int:
    """What the verdicts are now, for DVC: read with delta-rs (no Spark), 0 rows where none were given."""
    from cai_lib.lake.tables import Lake
    from jobs.common import write_pointer
    lake = Lake(a.lake)
    write_pointer(a.pointer, lake, ["review_events"])
    print(f"cai review pointer: review_events {lake.snapshot(['review_events'])['review_events']} -> {a.pointer}",
          flush=True)
    return 0


def export(a: argparse.Namespace) -> int:
    store = ReviewStore(a.lake)
    settings = ReviewSettings(queue=queue_rules(a), principle_texts=principle_texts(constitution_files(a)))
    items = queue_for(store, settings, None, None, None)
    prompts, texts = store.texts_of([i.comparison for i in items])
    tasks = export_tasks(a.format, items, prompts, texts, settings.principle_texts, datetime.now(timezone.utc))
    out = Path(a.out)
    write_json(out, tasks)
    config = ""
    if a.format == "label-studio":
        config = str(out.with_name(out.stem + ".label_config.xml"))
        Path(config).write_text(LABEL_STUDIO_CONFIG)
    print(f"cai review export: {len(tasks)} {a.format} tasks -> {out}" + (f" (labeling config: {config})" if config
                                                                         else ""), flush=True)
    return 0


def import_file(a: argparse.Namespace) -> int:
    """Every row is read and checked before Spark starts; then the verdicts review_events lacks go in."""
    store = ReviewStore(a.lake)
    path = Path(a.file)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); import the tool's JSON export") from None
    annotations, skipped = read_annotations(a.format, data, a.reviewer_field, str(path))
    rows = review_rows(annotations, {c.comparison_id: c for c in store.comparisons()}, datetime.now(timezone.utc),
                       str(path))
    fresh, present = new_rows(rows, store.stored_verdicts([r["event_id"] for r in rows]), str(path))
    if fresh:
        from cai_lib.runtime.session import get_spark
        store.spark = get_spark(a.master, "cai-review", delta=True)
        store.insert(fresh)
    print(f"cai review import: {len(rows)} verdicts in {path} ({skipped} skipped: cancelled or not submitted); "
          f"{len(fresh)} new in review_events, {present} there already", flush=True)
    return 0


def serve(a: argparse.Namespace) -> int:
    settings = settings_of(a)          # every refusal before Spark or a socket starts
    store = ReviewStore(a.lake)
    from cai_lib.runtime.session import get_spark
    store.spark = get_spark(a.master, "cai-review", delta=True)
    import uvicorn
    print(f"cai review: http://{a.host}:{a.port}/ (lake {a.lake}, "
          f"{'tokens for ' + str(len(settings.tokens)) + ' reviewers' if settings.tokens else 'reviewer ' + settings.reviewer})",
          flush=True)
    uvicorn.run(build_app(store, settings), host=a.host, port=a.port, log_level="warning")
    return 0
