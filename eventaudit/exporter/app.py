"""The exporter's HTTP surface: /metrics, /healthz, /api/v1/missed and a status page."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CollectorRegistry

from eventaudit.contract import (
    InvalidMessageError,
    epoch_ms,
    is_pubsub_id,
    parse_ascii_int,
    validate_event_id,
)
from eventaudit.exporter import status
from eventaudit.exporter.collector import EvaluationState
from eventaudit.exporter.missed import MissedAnswers
from eventaudit.exporter.snapshot import list_missed
from eventaudit.exporter.story import (
    event_story,
    parse_publish_time,
    search_hours,
    story_link,
    trace_forms,
)
from eventaudit.http import json_error, metrics_view, register_json_errors
from eventaudit.store import ExporterStore, StoreError

log = logging.getLogger(__name__)

_MISSED_PARAMS = {"topic", "subscription", "window", "limit"}
MAX_LIMIT = 10_000
BUSY_RETRY_AFTER_SECONDS = 5
LOOKUP_CONCURRENCY = 1


@dataclass(frozen=True)
class ExporterDeps:
    """What the exporter's routes need."""

    store: ExporterStore
    state: EvaluationState
    registry: CollectorRegistry
    missed: MissedAnswers = field(default_factory=MissedAnswers)
    project: str = ""
    """The Pub/Sub project, for Cloud Trace names."""
    lookups: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(LOOKUP_CONCURRENCY)
    )
    """Event stories computed at once (apart from /api/v1/missed's: lookups of invented ids
    must not keep the alerts' drill-down busy)."""


bp = Blueprint("exporter", __name__)


def _deps() -> ExporterDeps:
    deps: ExporterDeps = current_app.config["DEPS"]
    return deps


@bp.get("/api/v1/missed")
def missed() -> Any:
    """The missed events behind `eventaudit_missed_events` for one subscription and window.

    400 for a malformed query, 503 while the numbers are not served (eventaudit_up 0), 404 for
    a topic or subscription the latest evaluation does not report in that window. `missed` is
    always the gauge's value, and `events` lists those very events (the records the evaluation
    counted: nothing folded in after it). Each answer is computed once per evaluation and then
    served from memory; 429 with Retry-After while the allowed number of listings is being
    computed, so callers cannot take every HTTP thread.
    """
    unknown = sorted(set(request.args) - _MISSED_PARAMS)
    if unknown:
        return json_error(400, f"unknown query parameter(s): {_names(unknown)}")
    if any(len(request.args.getlist(k)) > 1 for k in request.args):
        return json_error(400, "each query parameter may be given once")
    topic = request.args.get("topic", "")
    subscription = request.args.get("subscription", "")
    for name, value in (("topic", topic), ("subscription", subscription)):
        if not is_pubsub_id(value):
            return json_error(400, f"{name} must be a Pub/Sub id (letters, digits, - _ . ~ + %)")
    limit = parse_ascii_int(request.args.get("limit", "100"), max_digits=5)
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        return json_error(400, f"limit must be an integer from 1 to {MAX_LIMIT}")

    deps = _deps()
    up, snapshot, reason = deps.state.current()
    if not up or snapshot is None:
        return json_error(503, reason or "no evaluation has completed yet")
    label = request.args.get("window", snapshot.windows[0].label)
    window = snapshot.window(label)
    if window is None:
        allowed = ", ".join(w.label for w in snapshot.windows)
        return json_error(400, f"window must be one of: {allowed}")
    if topic not in snapshot.published:
        return json_error(404, f"topic {topic} is not reported")
    if label not in snapshot.subscriptions.get((topic, subscription), {}):
        return json_error(
            404, f"subscription {subscription} of topic {topic} is not reported in window {label}"
        )
    end = snapshot.frontier_of(topic)
    start = end - window.length
    stats = snapshot.subscriptions[(topic, subscription)][label]
    key = (topic, subscription, label)
    answer = deps.missed.cached(snapshot, key)
    if answer is None:
        if not deps.missed.try_acquire():
            resp, status = json_error(
                429, "too many missed-event listings in progress; retry later"
            )
            resp.headers["Retry-After"] = str(BUSY_RETRY_AFTER_SECONDS)
            return resp, status
        try:
            listed = list_missed(
                snapshot, deps.store, topic, subscription, window, deps.missed.keep_events
            )
        except StoreError as exc:
            deps.missed.failed()
            log.error("missed events of %s/%s: %s", topic, subscription, exc)
            return json_error(503, "audit store unavailable")
        finally:
            deps.missed.release()
        answer = deps.missed.store(snapshot, key, stats.missed, listed)
        if answer.events is None:
            log.info(
                "missed events of %s/%s/%s: digests disagree with the evaluation",
                topic,
                subscription,
                label,
            )
    if answer.events is None:
        return json_error(
            503, "the stored digests disagree with the last evaluation; retry after the next"
        )
    return jsonify(
        topic=topic,
        subscription=subscription,
        window=label,
        start=start.isoformat(),
        end=end.isoformat(),
        missed=answer.missed,
        deadLettered=stats.dead_lettered,
        lost=answer.missed - stats.dead_lettered,
        truncated=answer.missed > limit,
        events=[
            {
                "eventID": e.event_id,
                "traceID": e.trace_id,
                "publishTime": e.publish_time.isoformat(),
                "fate": "lost" if e.dead_letter_attempts is None else "dead_lettered",
                "deliveryAttempts": e.dead_letter_attempts,
                "trace": trace_forms(e.trace_id, deps.project),
                "story": story_link(e.event_id, epoch_ms(e.publish_time)),
            }
            for e in answer.events[:limit]
        ],
    )


@bp.get("/api/v1/events/<event_id>")
def event(event_id: str) -> Any:
    """One event's story: its publish record(s) and, per subscription expected on its topic,
    the receipt, the dead letter and the verdict the latest evaluation counted.

    400 for a malformed id or query, 404 when no publish record of it is in the hours looked
    in (its publish time's with `publishTime=`, else the hours the windows reach), 503 while
    the numbers are not served; one lookup at a time (429 beyond it), apart from
    /api/v1/missed's limit.
    """
    unknown = sorted(set(request.args) - {"publishTime"})
    if unknown:
        return json_error(400, f"unknown query parameter(s): {_names(unknown)}")
    return _story(event_id)


@bp.get("/api/v1/events")
def event_by_query() -> Any:
    """The same story, the id given as `eventID=`: the form whose links work for every id
    (a browser removes `.` and `..` from a path)."""
    unknown = sorted(set(request.args) - {"eventID", "publishTime"})
    if unknown:
        return json_error(400, f"unknown query parameter(s): {_names(unknown)}")
    if len(request.args.getlist("eventID")) != 1:
        return json_error(400, "eventID must be given once")
    return _story(request.args["eventID"])


def _names(names: list[str]) -> str:
    """Parameter names for an error: the first five, each cut to 64 characters."""
    shown = [n if len(n) <= 64 else f"{n[:64]}..." for n in names[:5]]
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _story(event_id: str) -> Any:
    try:
        validate_event_id(event_id)
    except InvalidMessageError as exc:
        return json_error(400, f"eventID: {exc}")
    publish_time = None
    if "publishTime" in request.args:
        if len(request.args.getlist("publishTime")) > 1:
            return json_error(400, "publishTime may be given once")
        publish_time = parse_publish_time(request.args["publishTime"])
        if publish_time is None:
            return json_error(400, "publishTime must be epoch milliseconds (ASCII digits)")
    deps = _deps()
    up, snapshot, reason = deps.state.current()
    if not up or snapshot is None:
        return json_error(503, reason or "no evaluation has completed yet")
    if not deps.lookups.acquire(blocking=False):
        resp, status = json_error(429, "an event lookup is in progress; retry later")
        resp.headers["Retry-After"] = str(BUSY_RETRY_AFTER_SECONDS)
        return resp, status
    try:
        hours = search_hours(snapshot, datetime.now(UTC), publish_time)
        story = event_story(snapshot, deps.store, event_id, hours, deps.project)
    except StoreError as exc:
        log.error("story of event %s: %s", event_id, exc)
        return json_error(503, "audit store unavailable")
    finally:
        deps.lookups.release()
    if story is None:
        return json_error(
            404,
            f"no publish record of event {event_id} in the hours searched",
            searched=[h.isoformat() for h in hours],
        )
    return jsonify(story)


@bp.get("/healthz")
def healthz() -> Any:
    """200 while the numbers are served, 503 with a short reason otherwise."""
    state = _deps().state
    up, _, reason = state.current()
    if not up:
        return json_error(503, reason or "no evaluation has completed yet", up=0)
    return jsonify(status="ok", up=1, lastEvaluation=state.last_success)


@bp.get("/")
def status_page() -> Response:
    """The status page of the latest evaluation (only the health while it is not served)."""
    return Response(status.render(_deps().state), mimetype="text/html")


def create_app(deps: ExporterDeps) -> Flask:
    """The exporter's Flask app."""
    app = Flask("exporter")
    app.config.update(DEPS=deps)
    app.register_blueprint(bp)
    app.add_url_rule("/metrics", "metrics", metrics_view(deps.registry))
    register_json_errors(app)
    return app
