"""Which file content is the culprit of an incident nobody recognises: the one that the
incident's devices have and healthy devices do not.

This is how the culprit of July 2024 was found by hand (the one channel file every crashing
machine had, that healthy machines did not, and that had changed an hour before), and how crash
systems rank attributes of a crash signature (Mozilla's crash correlations: an attribute
over-represented in one signature against all crashes). Here the attributes are the files a
boot depends on: each (path, sha256) of the drivers, channel files and driver store.

- **The incident's devices**: every device with a report in the incident, with the files its
  latest report there lists.
- **The healthy devices**: every device whose state is healthy, that has no report in the
  incident, with the inventory of its last health report (fleetfiles.py).
- For each content that at least one of the incident's devices has, the 2x2 table (incident or
  healthy, has it or not) gives:
  - the **share** in each group;
  - the **odds ratio**, with 0.5 added to each cell (Haldane-Anscombe) so that a content no
    healthy device has gets a finite, large ratio;
  - the **one-sided Fisher exact test**: the probability, if the content had nothing to do with
    the crash, that the incident's devices would hold at least as many copies of it as they do
    (the hypergeometric tail). Exact at any size, and cheap: the tail is summed term by term
    from the observed count with the ratio of successive terms, until the terms vanish.
  - its **onset**: when the fleet first reported it (fleetfiles.py), before the incident's
    first report.
- Ranked by p-value, then odds ratio, then share among the incident's devices. A file every
  device has (p = 1), or one that changed on most devices of both groups (a decoy: p near
  0.5), ranks below one that most crashing devices have and few healthy ones do.

The statistics are a few lines of ``math`` (``lgamma`` for the first term): SciPy would add
a large dependency for one function.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from recovery_agent.protocol.admin import Candidate, Correlation

from .errors import NotFound
from .fleetfiles import READ_PAGE, listed_files
from .store import Reader, parse_iso

# At most this many candidates are returned (the table a person reads).
TOP = 20
# The top candidate becomes a draft fix (incidents.py) only with evidence this strong: on at
# least half of the incident's devices, and this unlikely by chance.
DRAFT_MIN_SHARE = 0.5
DRAFT_MAX_P = 1e-3


def likely_culprit(corr: Correlation) -> Candidate | None:
    """The top candidate, if the evidence is strong enough to draft a fix from it."""
    if not corr.candidates or corr.healthy_devices == 0:
        return None
    top = corr.candidates[0]
    if top.crashing_share < DRAFT_MIN_SHARE or top.p_value > DRAFT_MAX_P or top.odds_ratio <= 1:
        return None
    return top


@dataclass(frozen=True)
class Table:
    """The 2x2 table of one content: ``a`` of ``n1`` incident devices have it, ``c`` of ``n2``
    healthy devices."""

    a: int
    n1: int
    c: int
    n2: int

    def odds_ratio(self) -> float:
        b, d = self.n1 - self.a, self.n2 - self.c
        return ((self.a + 0.5) * (d + 0.5)) / ((b + 0.5) * (self.c + 0.5))

    def log_p_value(self) -> float:
        """ln P(X >= a) for X hypergeometric: ``n1`` drawn from ``n1 + n2`` devices of which
        ``a + c`` have the content (Fisher's exact test, the alternative: over-represented).
        In logs, so that a culprit on thousands of devices (p far below 1e-300) still ranks."""
        big_n, k, n = self.n1 + self.n2, self.a + self.c, self.n1
        if self.a <= max(0, n + k - big_n):
            return 0.0  # the smallest count possible: every outcome is at least as extreme
        x, top = self.a, min(k, n)
        first = _log_comb(k, x) + _log_comb(big_n - k, n - x) - _log_comb(big_n, n)
        term, total = 1.0, 1.0  # the terms relative to the first
        while x < top:
            term *= ((k - x) * (n - x)) / ((x + 1) * (big_n - k - n + x + 1))  # pmf(x+1) / pmf(x)
            total += term
            x += 1
            if term < total * 1e-17:
                break
        return min(0.0, first + math.log(total))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def correlate(db: Reader, incident_id: str, top: int = TOP) -> Correlation:
    """The ranked candidates of ``incident_id`` (NotFound if there is no such incident)."""
    incident = db.one("SELECT first_seen FROM incidents WHERE incident_id = ?", incident_id)
    if incident is None:
        raise NotFound(f"no incident {incident_id}")
    # Each device's latest report, by id first, then their payloads a page at a time: a
    # fleet's incident (100,000 reports of some kilobytes) never sits in memory whole.
    latest: dict[str, str] = {}
    for r in db.all(
        "SELECT device_id, report_id FROM reports WHERE incident_id = ? ORDER BY received_at, report_id",
        incident_id,
    ):
        latest[r["device_id"]] = r["report_id"]
    crashing: Counter[tuple[str, str]] = Counter()
    versions: dict[tuple[str, str], str | None] = {}
    ids = list(latest.values())
    for i in range(0, len(ids), READ_PAGE):
        page = ids[i : i + READ_PAGE]
        marks = ",".join("?" * len(page))
        for r in db.all(f"SELECT payload FROM reports WHERE report_id IN ({marks})", *page):
            held = set()
            for f in listed_files(r["payload"]):
                held.add((f["path"], f["sha256"]))
                versions.setdefault((f["path"], f["sha256"]), f.get("version"))
            crashing.update(held)
    healthy_filter = (
        "FROM devices WHERE state = 'healthy' AND revoked_at IS NULL AND inventory_digest IS NOT NULL "
        "AND device_id NOT IN (SELECT device_id FROM reports WHERE incident_id = ?)"
    )
    n2 = int(db.scalar(f"SELECT count(*) {healthy_filter}", incident_id) or 0)
    healthy = {
        (r["path"], r["sha256"]): int(r["n"])
        for r in db.all(
            "SELECT path, sha256, count(*) AS n FROM device_files "
            f"WHERE device_id IN (SELECT device_id {healthy_filter}) GROUP BY path, sha256",
            incident_id,
        )
    }
    n1 = len(latest)
    notes = []
    if n2 == 0:
        notes.append(
            "no healthy device has sent its inventory yet: nothing to compare with, so every "
            "file the incident's devices have ranks alike (p = 1)"
        )
    scored = []
    for key, a in crashing.items():
        t = Table(a, n1, healthy.get(key, 0), n2)
        scored.append((t.log_p_value(), -t.odds_ratio(), -a, key, t))
    scored.sort(key=lambda s: s[:4])
    first_report = parse_iso(incident["first_seen"])
    candidates = []
    for log_p, _, _, (path, sha256), t in scored[:top]:
        seen = db.one("SELECT first_seen_at FROM file_contents WHERE path = ? AND sha256 = ?", path, sha256)
        first_seen = parse_iso(seen["first_seen_at"]) if seen else None
        candidates.append(
            Candidate(
                path=path,
                sha256=sha256,
                version=versions.get((path, sha256)),
                crashing=t.a,
                healthy=t.c,
                crashing_share=round(t.a / n1, 4) if n1 else 0.0,
                healthy_share=round(t.c / n2, 4) if n2 else 0.0,
                odds_ratio=round(t.odds_ratio(), 3),
                p_value=math.exp(log_p),
                first_seen_at=first_seen,
                onset_before_s=(first_report - first_seen).total_seconds() if first_seen else None,
            )
        )
    return Correlation(
        incident_id=incident_id,
        crashing_devices=n1,
        healthy_devices=n2,
        candidates=candidates,
        notes=notes,
    )
