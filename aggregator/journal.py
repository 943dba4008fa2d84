"""Durable acceptance: an append-only journal of accepted updates, with group commit.

An update is acknowledged only once it is on disk, but the disk is not asked once per
update: the service stages every verdict of a batch of messages, then `commit()` makes
them durable with one fsync of the bodies and one SQLite commit, and only then do the
acks go out. A restart replays the open round's accepted bodies, in the order they were
folded, onto the latest snapshot of its sum: the same float64 sum bit for bit.

    <state_dir>/journal.sqlite       SQLite in WAL mode: `rounds` (each open round as
                                     announced), `accepted` (index of accepted updates:
                                     id, round, device, weight, where its body is) and
                                     `verdicts` (the ledger: every verdict with its reason)
    <state_dir>/journal/<round>.bodies   the accepted bodies of one round, appended
    <state_dir>/journal/<round>.snapshot the round's running sum after `seq`, now and then

The bodies live outside SQLite on purpose: in WAL mode every byte SQLite stores is written
twice (the WAL, then the checkpoint into the database), while an appended body is
written once; the database keeps only small rows. A body whose index row never committed
is garbage at the end of the file and is never read.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from fedmq.atomicfile import move_aside, write_atomic

# No secondary index and no AUTOINCREMENT: every commit appends each page it changed to
# the WAL, so each index would add a 4 KiB page per commit (ids are deduplicated in memory;
# a round's rows are found by a scan of at most keep_ids rows, once, at a restart).
SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accepted (
    seq INTEGER PRIMARY KEY,
    update_id TEXT NOT NULL,
    round_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    codec TEXT NOT NULL,
    weight REAL NOT NULL,
    norm REAL NOT NULL,
    body_offset INTEGER NOT NULL,
    body_length INTEGER NOT NULL,
    wire_bytes INTEGER NOT NULL,
    fetched_bytes INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS verdicts (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    update_id TEXT NOT NULL,
    device TEXT NOT NULL,
    round_id INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Accepted:
    """One accepted update as the journal keeps it: enough to fold it in again."""

    update_id: str
    round_id: int  # the open round (sync) or buffer (async) it was folded into
    device: str
    codec: str
    body: bytes
    weight: float
    norm: float
    wire_bytes: int
    fetched_bytes: int
    record: dict[str, Any]  # its entry in the round's participants


@dataclass(frozen=True)
class Snapshot:
    """A round's running sum after the accepted update numbered `seq`."""

    seq: int
    count: int
    total_weight: float
    sums: bytes  # encode_weights of the float64 sums


class Journal:
    """The journal and ledger of one state directory."""

    def __init__(
        self, *, root: Path, keep_ids: int = 100_000, keep_verdicts: int = 1_000_000
    ) -> None:
        self.root = Path(root)
        self.dir = self.root / "journal"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep_ids = keep_ids
        self.keep_verdicts = keep_verdicts  # the ledger keeps the newest this many verdicts
        # isolation_level=None: transactions are begun and committed here, explicitly;
        # the service may be built in one thread and run in another (never both at once)
        self.db = sqlite3.connect(self.root / "journal.sqlite", isolation_level=None,
                                  check_same_thread=False)  # fmt: skip
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
        self.db.executescript(SCHEMA)
        self._bodies: dict[int, Any] = {}  # round id -> open append handle
        self._dirty: set[int] = set()  # rounds with bodies written since the last fsync
        self._in_tx = False
        self.staged = 0  # verdicts waiting for commit()
        # told (op, seconds) of each body append, body fsync and SQLite commit (metrics)
        self.timed: Callable[[str, float], None] | None = None

    # ------------------------------------------------------------ writing

    def _begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def open_round(self, round_id: int, meta: dict[str, Any]) -> None:
        """Record an opened round as announced (its selection, deadline, target)."""
        self._begin()
        self.db.execute(
            "INSERT OR REPLACE INTO rounds VALUES (?, ?)", (round_id, json.dumps(meta))
        )
        self.staged += 1

    def stage_accept(self, a: Accepted) -> None:
        """Append an accepted update's body and stage its index row and verdict."""
        fh = self._bodies.get(a.round_id)
        if fh is None:
            fh = self._bodies[a.round_id] = open(self._body_path(a.round_id), "ab")  # noqa: SIM115
        offset = fh.tell()
        t0 = time.perf_counter()
        fh.write(a.body)
        self._took("append", t0)
        self._dirty.add(a.round_id)
        self._begin()
        self.db.execute(
            "INSERT INTO accepted (update_id, round_id, device, codec, weight, norm, "
            "body_offset, body_length, wire_bytes, fetched_bytes, record) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (a.update_id, a.round_id, a.device, a.codec, a.weight, a.norm, offset,
             len(a.body), a.wire_bytes, a.fetched_bytes, json.dumps(a.record)),
        )  # fmt: skip
        self.stage_verdict(a.update_id, a.device, a.round_id, "accepted", "")

    def stage_verdict(
        self, update_id: str, device: str, round_id: int, verdict: str, reason: str
    ) -> None:
        """Stage one ledger entry (accepted, duplicate, late or rejected, with a reason)."""
        self._begin()
        self.db.execute(
            "INSERT INTO verdicts (at, update_id, device, round_id, verdict, reason) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), update_id, device, round_id, verdict, reason),
        )
        self.staged += 1

    def commit(self) -> int:
        """Make everything staged durable: one fsync of the bodies, one SQLite commit.

        Returns how many entries it covered; acks for them may go out after it."""
        t0 = time.perf_counter()
        for round_id in self._dirty:
            fh = self._bodies[round_id]
            fh.flush()
            os.fsync(fh.fileno())
        if self._dirty:
            self._took("fsync", t0)
        self._dirty.clear()
        if self._in_tx:
            t0 = time.perf_counter()
            self.db.execute("COMMIT")
            self._took("commit", t0)
            self._in_tx = False
        n, self.staged = self.staged, 0
        return n

    def _took(self, op: str, since: float) -> None:
        if self.timed is not None:
            self.timed(op, time.perf_counter() - since)

    def save_snapshot(self, round_id: int, snap: Snapshot) -> None:
        """Keep a round's running sum so a restart replays only what came after it."""
        blob = msgpack.packb(
            {"seq": snap.seq, "count": snap.count, "total_weight": snap.total_weight,
             "sums": snap.sums},
            use_bin_type=True,
        )  # fmt: skip
        write_atomic(self.dir / f"{round_id:06d}.snapshot", blob)

    def close_round(self, round_id: int) -> None:
        """Forget a committed round's bodies and snapshot (its ids stay, for dedupe); prune
        the ids and the ledger to their bounds."""
        fh = self._bodies.pop(round_id, None)
        if fh is not None:
            fh.close()
        self._dirty.discard(round_id)
        for path in self.dir.glob(f"{round_id:06d}.*"):
            path.unlink(missing_ok=True)
        # bounded: the newest keep_ids accepted ids are enough to recognise a resend
        self._begin()
        self.db.execute(
            "DELETE FROM accepted WHERE seq <= (SELECT MAX(seq) FROM accepted) - ?",
            (self.keep_ids,),
        )
        self.db.execute("DELETE FROM rounds WHERE round_id <= ?", (round_id,))
        self.db.execute(
            "DELETE FROM verdicts WHERE seq <= (SELECT MAX(seq) FROM verdicts) - ?",
            (self.keep_verdicts,),
        )
        self.commit()

    def quarantine_round(self, round_id: int, into: Path) -> list[Path]:
        """Move a round that cannot be recovered (its bodies and snapshot) into the folder
        `into` and forget it as an open round; its ids stay, for dedupe. Returns the files
        moved."""
        fh = self._bodies.pop(round_id, None)
        if fh is not None:
            fh.close()
        self._dirty.discard(round_id)
        moved = [move_aside(p, into) for p in sorted(self.dir.glob(f"{round_id:06d}.*"))]
        self._begin()
        self.db.execute("DELETE FROM rounds WHERE round_id = ?", (round_id,))
        self.commit()
        return moved

    def close(self) -> None:
        """Commit what is staged and close the files."""
        self.commit()
        for fh in self._bodies.values():
            fh.close()
        self._bodies.clear()
        self.db.close()

    # ------------------------------------------------------------ reading

    def _body_path(self, round_id: int) -> Path:
        return self.dir / f"{round_id:06d}.bodies"

    def round_meta(self, round_id: int) -> dict[str, Any] | None:
        """An open round as it was announced, if the journal has it."""
        row = self.db.execute("SELECT meta FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def snapshot(self, round_id: int) -> Snapshot | None:
        """The newest snapshot of a round's sum, if one was taken."""
        path = self.dir / f"{round_id:06d}.snapshot"
        if not path.exists():
            return None
        obj = msgpack.unpackb(path.read_bytes(), raw=False)
        return Snapshot(obj["seq"], obj["count"], obj["total_weight"], obj["sums"])

    def replay(self, round_id: int, *, after_seq: int = 0) -> Iterator[tuple[int, Accepted]]:
        """The round's accepted updates after after_seq, in the order they were folded."""
        rows = self.db.execute(
            "SELECT seq, update_id, device, codec, weight, norm, body_offset, body_length, "
            "wire_bytes, fetched_bytes, record FROM accepted "
            "WHERE round_id = ? ORDER BY seq",
            (round_id,),
        ).fetchall()
        if not rows:
            return
        with open(self._body_path(round_id), "rb") as fh:
            for seq, uid, device, codec, w, norm, off, length, wire, fetched, rec in rows:
                fh.seek(off)
                body = fh.read(length)
                if len(body) != length:
                    raise ValueError(f"journal body of update {uid} is truncated")
                if seq <= after_seq:
                    continue
                yield seq, Accepted(uid, round_id, device, codec, body, w, norm, wire,
                                    fetched, json.loads(rec))  # fmt: skip

    def accepted_in(self, round_id: int) -> list[Accepted]:
        """Every accepted update of a round, bodies left out (for its stats)."""
        rows = self.db.execute(
            "SELECT update_id, device, codec, weight, norm, wire_bytes, fetched_bytes, record "
            "FROM accepted WHERE round_id = ? ORDER BY seq",
            (round_id,),
        ).fetchall()
        return [Accepted(uid, round_id, dev, codec, b"", w, n, wire, fetched, json.loads(rec))
                for uid, dev, codec, w, n, wire, fetched, rec in rows]  # fmt: skip

    def last_seq(self) -> int:
        """The sequence number of the newest accepted update (0 when none)."""
        row = self.db.execute("SELECT MAX(seq) FROM accepted").fetchone()
        return int(row[0] or 0)

    def counted_ids(self) -> dict[str, int]:
        """The newest accepted update ids with the round each was folded into, oldest first."""
        rows = self.db.execute(
            "SELECT update_id, round_id FROM accepted ORDER BY seq DESC LIMIT ?", (self.keep_ids,)
        ).fetchall()
        return {uid: int(r) for uid, r in reversed(rows)}


def read_ledger(state_dir: Path) -> list[dict[str, Any]]:
    """Every verdict an aggregator's state directory holds, oldest first (for tests, tools)."""
    path = Path(state_dir) / "journal.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT seq, at, update_id, device, round_id, verdict, reason FROM verdicts "
            "ORDER BY seq"
        ).fetchall()
    except sqlite3.OperationalError:  # an aggregator that is still creating it
        rows = []
    finally:
        db.close()
    keys = ("seq", "at", "update_id", "device", "round", "verdict", "reason")
    return [dict(zip(keys, row, strict=True)) for row in rows]
