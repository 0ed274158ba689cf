"""A writer that loses a commit race retries: its rows are still new, so the insert-only MERGE is
redone on the new snapshot and inserts what is missing. Finished model work is never thrown away.
The race is real: another writer commits between this writer opening its snapshot and committing."""
from __future__ import annotations

import pyarrow as pa
import pytest

from cai_lib.lake import tables
from cai_lib.lake.tables import CommitRaceError, Lake
from tests.synthetic_lake import build_clean_lake


def renamed(events: pa.Table, tag: str) -> pa.Table:
    ids = pa.array([f"{e}-{tag}" for e in events["event_id"].to_pylist()])
    return events.set_column(events.schema.get_field_index("event_id"), "event_id", ids)


@pytest.fixture
def racing(tmp_path, monkeypatch):
    """(lake, events, races): each of this lake's commits is preceded by another writer's commit."""
    lake = build_clean_lake(tmp_path / "lake")
    events = lake.read("generation_events").slice(0, 10)
    other, races = Lake(lake.root), []
    real_table = Lake.table

    def table(self, name):
        dt = real_table(self, name)              # this writer's snapshot, opened now
        if self is lake and len(races) < races_allowed[0]:
            races.append(name)
            other.insert_new(name, renamed(events, f"other-{len(races)}"))   # commits after that snapshot
        return dt
    races_allowed = [2]
    monkeypatch.setattr(Lake, "table", table)
    monkeypatch.setattr(tables.time, "sleep", lambda s: None)
    return lake, events, races, races_allowed


def test_a_lost_commit_race_is_retried_and_every_row_lands_once(racing):
    lake, events, races, _ = racing
    before = lake.count("generation_events")
    assert lake.insert_new("generation_events", renamed(events, "mine")) == 10
    assert races == ["generation_events", "generation_events"]      # it lost twice, then committed
    ids = lake.read("generation_events")["event_id"].to_pylist()
    assert len(ids) == len(set(ids)) == before + 30
    assert {f"{e}-mine" for e in events["event_id"].to_pylist()} <= set(ids)


def test_a_writer_that_keeps_losing_stops_with_a_message_naming_the_table(racing, monkeypatch):
    lake, events, races, allowed = racing
    allowed[0] = 10**6
    monkeypatch.setattr(tables, "COMMIT_ATTEMPTS", 3)
    with pytest.raises(CommitRaceError, match=r"generation_events: lost the commit race 3 times in a row to another writer "
                                        r"of .*Fix: let the other run finish, then rerun this job"):
        lake.insert_new("generation_events", renamed(events, "mine"))
    assert len(races) == 3
