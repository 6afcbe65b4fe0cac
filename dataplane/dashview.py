"""What the admin dashboard shows, as data and as plain HTML tables.

The dashboard answers the questions of someone watching a rollout: which configuration
runs and since when, which routes send what where, which endpoints are up, whether the
canary gets its share, how many requests and errors each route has now, and what went
wrong lately. Everything comes from what the dataplane keeps anyway (the applied
Config, the request counters of `metrics.py`, the split windows): the dashboard adds no
work to requests, and costs nothing while nobody looks.

Rates and recent errors are differences between two reads of the counters
(`Traffic.observe`, one per page refresh): the first read has no rate yet. The HTML is
rendered here, on the server, so the page is complete without scripts; the page's
script only fetches the same tables again.

Pure: no I/O, no clock (`now` is passed in).
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any

from kanal.contract.splits import SplitObservation

if TYPE_CHECKING:
    from kanal.dataplane.metrics import RequestMetrics
    from kanal.dataplane.runtime import Config
    from kanal.dataplane.splitwatch import SplitWatch

__all__ = ["RECENT_ERRORS", "Traffic", "dashboard_view", "render_tables"]

RECENT_ERRORS = 50
"""Recent error lines kept, newest first."""

RATE_SPAN = 10.0
"""Seconds of reads a rate is averaged over (when reads are that far apart)."""

MIN_RATE_SPAN = 0.5
"""Reads closer together than this give no rate yet (it would be mostly noise)."""

_EVENT_WORDS = {
    "unhealthy": "an endpoint failed its health check",
    "ejection": "a circuit opened (endpoint ejected)",
    "overload": "a request was refused: upstream over its connection limits",
}


@dataclass
class RouteTraffic:
    """Requests and 5xx answers of one route: totals, and per second between reads."""

    requests: int = 0
    errors: int = 0
    request_rate: float | None = None
    error_rate: float | None = None


@dataclass
class Traffic:
    """Turns successive reads of the request counters into rates and recent errors."""

    history: deque[tuple[float, dict[str, tuple[int, int]]]] = field(default_factory=deque)
    errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_ERRORS))
    _last_requests: dict[tuple[str, str, int], int] | None = None
    _last_events: dict[tuple[str, str], int] = field(default_factory=dict)
    _last_rejected: int = 0
    span: float = 0.0
    """Seconds between the reads the last rates were taken over (0: no rate yet)."""

    def observe(self, metrics: RequestMetrics, now: float) -> dict[str, RouteTraffic]:
        """Read the counters at `now` (wall-clock seconds); per route traffic."""
        totals: dict[str, tuple[int, int]] = {}
        for (route, _upstream, status), count in metrics.requests.items():
            requests, errors = totals.get(route, (0, 0))
            totals[route] = (requests + count, errors + (count if status >= 500 else 0))
        self._note_errors(metrics, now)
        history = self.history
        history.append((now, totals))
        while len(history) > 2 and now - history[1][0] >= RATE_SPAN:
            history.popleft()
        then, before = history[0]
        span = self.span = now - then if now - then >= MIN_RATE_SPAN else 0.0
        found: dict[str, RouteTraffic] = {}
        for route, (requests, errors) in totals.items():
            traffic = RouteTraffic(requests, errors)
            if span:
                old_requests, old_errors = before.get(route, (0, 0))
                traffic.request_rate = max(0, requests - old_requests) / span
                traffic.error_rate = max(0, errors - old_errors) / span
            found[route] = traffic
        return found

    def _note_errors(self, metrics: RequestMetrics, now: float) -> None:
        """Recent errors: 5xx answers, health failures, ejections and refused
        configurations counted since the previous read (at the first: since start)."""
        current = dict(metrics.requests)
        events = dict(metrics.events)
        rejected = metrics.config_rejected
        last = self._last_requests
        # The first read lists what was counted before it, one line per kind.
        since = "" if last is not None else " since the dataplane started"
        for (route, upstream, status), count in sorted(current.items()):
            new = count - (last or {}).get((route, upstream, status), 0)
            if status >= 500 and new > 0:
                where = f"route {route or '(none)'}" + (f" to {upstream}" if upstream else "")
                self._add(now, f"{new} × {status} from {where}{since}", route=route,
                          upstream=upstream, status=status)
        for (name, upstream), count in sorted(events.items()):
            new = count - self._last_events.get((name, upstream), 0)
            words = _EVENT_WORDS.get(name)
            if words is not None and new > 0:
                times = f" ({new}×)" if new > 1 else ""
                self._add(now, f"upstream {upstream}: {words}{times}{since}", upstream=upstream)
        if rejected > self._last_rejected:
            self._add(now, f"a configuration was rejected (see the log){since}")
        self._last_requests = current
        self._last_events = events
        self._last_rejected = rejected

    def _add(self, now: float, message: str, **details: Any) -> None:
        self.errors.appendleft({"at": _iso(now), "message": message, **details})


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe_match(match: Any) -> str:
    parts = [f"{match.path.type} {match.path.value}"]
    if match.method:
        parts.append(match.method)
    parts += [f"header {h.name}" for h in match.headers]
    parts += [f"query {q.name}" for q in match.query_params]
    return " ".join(parts)


def _health(active: str, circuit: str, checked: bool) -> str:
    """An endpoint's health as the dashboard shows it: the active checks' verdict, or,
    for an Upstream without `healthCheck`, the passive one (unhealthy while its circuit
    is open: the breaker ejected it after failed requests)."""
    if checked:
        return active
    return "unhealthy" if circuit == "open" else "healthy"


def dashboard_view(
    config: Config | None,
    metrics: RequestMetrics,
    watch: SplitWatch,
    traffic: Traffic,
    now: float,
) -> dict[str, Any]:
    """Everything the dashboard shows, JSON-able (camelCase, like /config)."""
    per_route = traffic.observe(metrics, now)
    view: dict[str, Any] = {
        "version": None, "appliedAt": None, "generatedAt": _iso(now),
        "routes": [], "upstreams": [], "splits": [],
        "recentErrors": list(traffic.errors),
    }
    if config is None:
        return view
    observations: dict[tuple[str, int], SplitObservation] = {
        (o.route, o.rule): o for o in watch.observations()
    }
    view["version"] = config.version
    view["appliedAt"] = _iso(config.applied_at)
    for route in config.snapshot.routes:
        counted = per_route.get(route.key) or (
            RouteTraffic(0, 0, 0.0, 0.0) if traffic.span else RouteTraffic())
        rules = []
        for rule in route.rules:
            observation = observations.get((route.key, rule.index))
            shares = {s.upstream: s for s in observation.shares} if observation else {}
            total = sum(max(0, b.weight) for b in rule.backends)
            backends = []
            for backend in rule.backends:
                share = shares.get(backend.upstream)
                backends.append({
                    "upstream": backend.upstream,
                    "weight": backend.weight,
                    "declaredShare": max(0, backend.weight) / total if total else 0.0,
                    "observedShare": (observation.observed_share(share)
                                      if observation is not None and share is not None else None),
                })
            rules.append({
                "index": rule.index, "name": rule.name,
                "matches": [_describe_match(m) for m in rule.matches] or ["every request"],
                "backends": backends,
                "split": observation.message() if observation is not None else None,
            })
        view["routes"].append({
            "key": route.key, "hostnames": list(route.hostnames) or ["*"],
            "gateways": list(route.gateways), "rules": rules,
            "requests": counted.requests, "errors": counted.errors,
            "requestRate": counted.request_rate, "errorRate": counted.error_rate,
        })
    for key, upstream in sorted(config.upstreams.items()):
        checked = upstream.spec.health_check is not None
        view["upstreams"].append({
            "key": key,
            "policy": upstream.spec.policy,
            "healthChecked": checked,
            "endpoints": [
                {"address": state.key, "weight": state.weight,
                 "health": _health(state.health, state.circuit, checked),
                 "circuit": state.circuit, "activeRequests": state.active}
                for state in upstream.states
            ],
        })
    view["splits"] = [o.to_dict() for o in observations.values()]
    return view


# --------------------------------------------------------------------------- HTML


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _cell(text: object, cls: str = "") -> str:
    attribute = f' class="{cls}"' if cls else ""
    return f"<td{attribute}>{escape(str(text))}</td>"


def render_tables(view: Mapping[str, Any]) -> str:
    """The dashboard's content as plain HTML tables (what scripts refresh in place)."""
    out: list[str] = []
    version = view.get("version")
    out.append('<section id="configuration"><h2>Configuration</h2><p>')
    if version is None:
        out.append("No configuration applied yet.")
    else:
        out.append(f'Version <code id="version">{escape(str(version))}</code>, applied '
                   f'<span id="applied-at">{escape(str(view.get("appliedAt")))}</span>.')
    workers = view.get("workers")
    if workers:
        out.append(f' <span id="workers">Counts, rates, splits and requests in flight are '
                   f'sums over {int(workers["answered"])} of {int(workers["total"])} '
                   "workers.</span>")
    out.append(f' <span class="muted">Read at {escape(str(view.get("generatedAt")))}.</span>')
    out.append("</p></section>")

    out.append('<section id="routes"><h2>Routes</h2><table><thead><tr><th>Route</th>'
               "<th>Hostnames</th><th>Rule</th><th>Matches</th><th>Backends (weight, declared,"
               " observed)</th><th>Requests/s</th><th>5xx/s</th><th>Requests</th><th>5xx</th>"
               "</tr></thead><tbody>")
    routes = view.get("routes") or []
    if not routes:
        out.append('<tr><td colspan="9" class="muted">No routes.</td></tr>')
    for route in routes:
        rules = route["rules"] or [{"index": "–", "name": None, "matches": [], "backends": []}]
        for position, rule in enumerate(rules):
            out.append(f'<tr data-route="{escape(route["key"])}" data-rule="{rule["index"]}">')
            first = position == 0
            out.append(_cell(route["key"] if first else "", "key"))
            out.append(_cell(", ".join(route["hostnames"]) if first else ""))
            out.append(_cell(f'{rule["index"]}' + (f' ({rule["name"]})' if rule["name"] else "")))
            out.append(_cell("; ".join(rule["matches"])))
            weighted = rule["split"] is not None
            backends = "<br>".join(
                f'{escape(b["upstream"])} {b["weight"]}, {_share(b["declaredShare"])}'
                + (f', {_share(b["observedShare"])}' if weighted else "")
                for b in rule["backends"])
            out.append(f"<td>{backends}</td>")
            errors = route["errorRate"] or 0.0
            out.append(_cell(_rate(route["requestRate"]) if first else "", "num"))
            out.append(_cell(_rate(route["errorRate"]) if first else "",
                             "num bad" if first and errors > 0 else "num"))
            out.append(_cell(route["requests"] if first else "", "num"))
            out.append(_cell(route["errors"] if first else "", "num"))
            out.append("</tr>")
    out.append("</tbody></table></section>")

    out.append('<section id="splits"><h2>Weighted splits: declared and observed</h2>')
    splits = view.get("splits") or []
    if not splits:
        out.append('<p class="muted">No rule splits its traffic.</p>')
    else:
        out.append("<table><thead><tr><th>Route</th><th>Rule</th><th>Upstream</th>"
                   "<th>Weight</th><th>Declared</th><th>Observed</th><th>Requests in window</th>"
                   "</tr></thead><tbody>")
        for split in splits:
            for backend in split["backends"]:
                out.append(f'<tr data-split="{escape(split["route"])}/{split["rule"]}">')
                out.append(_cell(split["route"], "key"))
                out.append(_cell(split["rule"]))
                out.append(_cell(backend["upstream"]))
                out.append(_cell(backend["weight"], "num"))
                out.append(_cell(_share(backend["declaredShare"]), "num"))
                out.append(_cell(_share(backend["observedShare"]), "num"))
                out.append(_cell(backend["observed"], "num"))
                out.append("</tr>")
            out.append(f'<tr class="sentence"><td colspan="7">{escape(split["message"])}</td></tr>')
        out.append("</tbody></table>")
    out.append("</section>")

    out.append('<section id="upstreams"><h2>Upstreams and endpoints</h2><table><thead><tr>'
               "<th>Upstream</th><th>Policy</th><th>Endpoint</th><th>Weight</th><th>Health</th>"
               "<th>Circuit</th><th>Active requests</th></tr></thead><tbody>")
    upstreams = view.get("upstreams") or []
    if not upstreams:
        out.append('<tr><td colspan="7" class="muted">No upstreams.</td></tr>')
    for upstream in upstreams:
        endpoints = upstream["endpoints"] or [None]
        for position, endpoint in enumerate(endpoints):
            first = position == 0
            if endpoint is None:
                out.append(f'<tr data-upstream="{escape(upstream["key"])}">'
                           f'{_cell(upstream["key"], "key")}{_cell(upstream["policy"])}'
                           '<td colspan="5" class="muted">no endpoints</td></tr>')
                continue
            out.append(f'<tr data-upstream="{escape(upstream["key"])}" '
                       f'data-endpoint="{escape(endpoint["address"])}" '
                       f'data-health="{escape(endpoint["health"])}" '
                       f'data-circuit="{escape(endpoint["circuit"])}">')
            out.append(_cell(upstream["key"] if first else "", "key"))
            out.append(_cell(upstream["policy"] if first else ""))
            out.append(_cell(endpoint["address"]))
            out.append(_cell(endpoint["weight"], "num"))
            health = endpoint["health"]
            if not upstream["healthChecked"]:
                health += " (passive)"
            spread = endpoint.get("workers")  # a group's view: the workers may disagree
            if spread and spread["healthy"] != spread["total"]:
                health += f' (healthy in {spread["healthy"]} of {spread["total"]} workers)'
            out.append(_cell(health, "good" if endpoint["health"] == "healthy" else "bad"))
            circuit = endpoint["circuit"]
            if spread and spread["circuitClosed"] != spread["total"]:
                circuit += f' (closed in {spread["circuitClosed"]} of {spread["total"]} workers)'
            out.append(_cell(circuit, "good" if endpoint["circuit"] == "closed" else "bad"))
            out.append(_cell(endpoint["activeRequests"], "num"))
            out.append("</tr>")
    out.append("</tbody></table></section>")

    out.append('<section id="errors"><h2>Recent errors</h2>')
    errors_seen = view.get("recentErrors") or []
    if not errors_seen:
        out.append('<p class="muted">None seen.</p>')
    else:
        out.append("<table><thead><tr><th>Seen</th><th>What</th></tr></thead><tbody>")
        for entry in errors_seen:
            out.append(f"<tr>{_cell(entry['at'])}{_cell(entry['message'])}</tr>")
        out.append("</tbody></table>")
    out.append("</section>")
    return "".join(out)
