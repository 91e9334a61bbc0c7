"""``/metrics`` in Prometheus' text exposition format (version 0.0.4).

Fleet state comes from the store at scrape time (so several server processes report the same
numbers); HTTP request counts and durations are this process's own, labelled by route
template, never by raw path, so a scan cannot blow up the label set.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .service import RecoveryService

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class HttpMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.buckets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * (len(_BUCKETS) + 1))
        self.sums: dict[tuple[str, str], float] = defaultdict(float)
        self.long_polls_waiting = 0  # directive long polls now waiting (only the event loop writes it)
        # Connections (listener.py; only the event loop writes these).
        self.connections_open = 0
        self.connections_refused = 0
        self.timeouts: dict[str, int] = defaultdict(int)  # by phase: header, body

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            counts = self.buckets[(method, route)]
            for i, bound in enumerate(_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1
            self.sums[(method, route)] += seconds


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: object) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in kv.items()) + "}"


def render(service: RecoveryService, http: HttpMetrics) -> str:
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

    db = service.store
    family(
        "qmr_devices",
        "gauge",
        "Enrolled devices by state.",
        [(_labels(state=r[0]), r[1]) for r in db.all("SELECT state, count(*) FROM devices GROUP BY state")],
    )
    family(
        "qmr_incidents",
        "gauge",
        "Incidents (reports clustered by crash signature) by kind.",
        [(_labels(kind=r[0]), r[1]) for r in db.all("SELECT kind, count(*) FROM incidents GROUP BY kind")],
    )
    family(
        "qmr_reports_total",
        "counter",
        "Diagnostics reports accepted.",
        [("", db.scalar("SELECT count(*) FROM reports"))],
    )
    family(
        "qmr_remediations",
        "gauge",
        "Remediations by status.",
        [
            (_labels(status=r[0]), r[1])
            for r in db.all("SELECT status, count(*) FROM remediations GROUP BY status")
        ],
    )
    family(
        "qmr_directives_total",
        "counter",
        "Directives issued, by their outcome so far.",
        [
            (_labels(outcome=r[0]), r[1])
            for r in db.all("SELECT outcome, count(*) FROM directives GROUP BY outcome")
        ],
    )
    rollouts = db.all("SELECT rollout_id, state, current_wave FROM rollouts")
    family(
        "qmr_rollout_wave",
        "gauge",
        "Index of the wave a rollout has reached.",
        [(_labels(rollout=r[0], state=r[1]), r[2]) for r in rollouts],
    )
    family(
        "qmr_audit_entries",
        "gauge",
        "Entries in the hash-chained audit log.",
        [("", db.scalar("SELECT count(*) FROM events"))],
    )

    family(
        "qmr_store_transactions_total",
        "counter",
        "Write transactions this process began.",
        [("", service.store.transactions)],
    )
    family(
        "qmr_store_write_lock_wait_seconds_total",
        "counter",
        "Time this process waited for the database's write lock (other writers, other processes).",
        [("", round(service.store.write_lock_wait_s, 6))],
    )
    commits = service.commits.stats
    family(
        "qmr_report_commits_total",
        "counter",
        "Transactions of this process that stored reports (several at once: groupcommit.py).",
        [("", commits.batches)],
    )
    family(
        "qmr_reports_committed_total",
        "counter",
        "Reports those transactions stored; over qmr_report_commits_total, the reports per commit.",
        [("", commits.writes)],
    )
    family(
        "qmr_report_commit_reruns_total",
        "counter",
        "Of those transactions, how many ran again, each write in a savepoint, after one write failed.",
        [("", commits.reruns)],
    )

    family(
        "qmr_long_polls_waiting",
        "gauge",
        "Directive long polls waiting in this process.",
        [("", http.long_polls_waiting)],
    )

    family(
        "qmr_http_connections",
        "gauge",
        "Client connections open in this process.",
        [("", http.connections_open)],
    )
    family(
        "qmr_http_connections_refused_total",
        "counter",
        "Connections answered 503 and closed because this process had its maximum open.",
        [("", http.connections_refused)],
    )
    family(
        "qmr_http_timeouts_total",
        "counter",
        "Connections closed because a request's head or body did not arrive in time.",
        [(_labels(phase=phase), http.timeouts.get(phase, 0)) for phase in ("header", "body")],
    )

    with http._lock:
        requests = sorted(http.requests.items())
        buckets = sorted((k, list(v)) for k, v in http.buckets.items())
        sums = dict(http.sums)
    family(
        "qmr_http_requests_total",
        "counter",
        "HTTP requests served by this process.",
        [(_labels(method=m, route=r, status=s), n) for (m, r, s), n in requests],
    )
    out.append("# HELP qmr_http_request_duration_seconds Time to answer, by route (long polls included).")
    out.append("# TYPE qmr_http_request_duration_seconds histogram")
    for (m, r), counts in buckets:
        for bound, n in zip(_BUCKETS, counts, strict=False):
            out.append(f"qmr_http_request_duration_seconds_bucket{_labels(method=m, route=r, le=bound)} {n}")
        out.append(
            f"qmr_http_request_duration_seconds_bucket{_labels(method=m, route=r, le='+Inf')} {counts[-1]}"
        )
        out.append(f"qmr_http_request_duration_seconds_sum{_labels(method=m, route=r)} {sums[(m, r)]:.6f}")
        out.append(f"qmr_http_request_duration_seconds_count{_labels(method=m, route=r)} {counts[-1]}")
    return "\n".join(out) + "\n"
