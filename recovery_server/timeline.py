"""An incident over time, for the dashboard's incident page: its reports per stretch of time
(the spike, and after the fix the fall), the directives served for its remediations and their
outcomes, and the moments a remediation was approved or a rollout set.

The answer stays small whatever the incident's size: the span (first stored report to the last
thing that happened) is cut into at most ``MAX_TIMELINE_BUCKETS`` buckets of a round size, and
the database counts per bucket (grouped by a prefix of the stored time: the second, minute,
hour or day), so no report is read whole.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from recovery_agent.protocol.admin import (
    MAX_TIMELINE_BUCKETS,
    IncidentTimeline,
    TimelineBucket,
    TimelineMark,
)

from .store import Reader, Row, parse_iso

# Round bucket sizes, in seconds; beyond a day, whole days.
_SIZES = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
_DAY = 86400
# How much of a stored time (``2026-01-01T00:00:00Z``) names the second, minute, hour, day it
# falls in, and what completes such a prefix into a time again.
_PREFIXES = ((_DAY, 10, "T00:00:00Z"), (3600, 13, ":00:00Z"), (60, 16, ":00Z"), (1, 20, ""))


def bucket_size(span_s: float, max_buckets: int = MAX_TIMELINE_BUCKETS) -> int:
    """The smallest round size that covers ``span_s`` seconds, wherever they start, in at most
    ``max_buckets`` buckets."""
    for size in _SIZES:
        if span_s // size + 2 <= max_buckets:
            return size
    days = 1
    while (span_s // (days * _DAY)) + 2 > max_buckets:
        days += 1
    return days * _DAY


def _floor(t: datetime, size: int) -> int:
    return int(t.timestamp()) // size * size


def timeline(db: Reader, incident: Row) -> IncidentTimeline:
    """The timeline of ``incident`` (its row) from what ``db`` holds."""
    incident_id = incident["incident_id"]
    rems = [
        r["remediation_id"]
        for r in db.all("SELECT remediation_id FROM remediations WHERE incident_id = ?", incident_id)
    ]
    # Remediation ids are the server's own; still, bound them as parameters.
    in_rems = f"remediation_id IN ({','.join('?' * len(rems))})" if rems else "1 = 0"

    marks: list[TimelineMark] = []
    for rem in db.all(
        f"SELECT remediation_id, title, required_approvals FROM remediations WHERE {in_rems}", *rems
    ):
        times = [
            a["approved_at"]
            for a in db.all(
                "SELECT approved_at FROM approvals WHERE remediation_id = ? ORDER BY approved_at",
                rem["remediation_id"],
            )
        ]
        if len(times) >= rem["required_approvals"]:
            marks.append(
                TimelineMark(
                    at=parse_iso(times[rem["required_approvals"] - 1]),
                    kind="approved",
                    subject=rem["remediation_id"],
                    label=f"{rem['remediation_id']} approved",
                )
            )
    for ro in db.all(f"SELECT rollout_id, created_at FROM rollouts WHERE {in_rems}", *rems):
        marks.append(
            TimelineMark(
                at=parse_iso(ro["created_at"]),
                kind="rollout",
                subject=ro["rollout_id"],
                label=f"{ro['rollout_id']} set",
            )
        )
    marks.sort(key=lambda m: (m.at, m.subject))

    r = db.one(
        "SELECT min(received_at) AS first, max(received_at) AS last FROM reports WHERE incident_id = ?",
        incident_id,
    )
    first, last = (r["first"], r["last"]) if r else (None, None)
    d = db.one(
        f"SELECT max(issued_at) AS issued, max(outcome_at) AS outcome FROM directives WHERE {in_rems}",
        *rems,
    )
    assert d is not None  # an aggregate has its row
    start = parse_iso(first or incident["first_seen"])
    times = [start, *(parse_iso(t) for t in (last, d["issued"], d["outcome"]) if t), *(m.at for m in marks)]
    end = max(times)
    size = bucket_size((end - start).total_seconds())
    unit, length, pad = next(p for p in _PREFIXES if size % p[0] == 0)

    def counts(sql: str, *args: object) -> Counter[int]:
        c: Counter[int] = Counter()
        for row in db.all(sql, *args):
            at = parse_iso(row[0] + pad)
            c[_floor(at, size)] += row[1]
        return c

    per = f"substr(%s, 1, {length})"
    reports = counts(
        f"SELECT {per % 'received_at'}, count(*) FROM reports WHERE incident_id = ? GROUP BY 1", incident_id
    )
    served = counts(f"SELECT {per % 'issued_at'}, count(*) FROM directives WHERE {in_rems} GROUP BY 1", *rems)
    outcomes = {
        outcome: counts(
            f"SELECT {per % 'outcome_at'}, count(*) FROM directives WHERE {in_rems} "
            "AND outcome = ? AND outcome_at IS NOT NULL GROUP BY 1",
            *rems,
            outcome,
        )
        for outcome in ("succeeded", "failed")
    }
    lo, hi = _floor(start, size), _floor(end, size)
    buckets = [
        TimelineBucket(
            start=datetime.fromtimestamp(b, UTC),
            reports=reports[b],
            served=served[b],
            succeeded=outcomes["succeeded"][b],
            failed=outcomes["failed"][b],
        )
        for b in range(lo, hi + 1, size)
    ]
    assert len(buckets) <= MAX_TIMELINE_BUCKETS, (start, end, size)
    return IncidentTimeline(
        incident_id=incident_id,
        start=start,
        end=end,
        bucket_s=size,
        reports=sum(reports.values()),
        buckets=buckets,
        marks=marks,
    )
