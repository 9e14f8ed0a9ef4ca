"""`eventaudit-exporter lookup EVENT_ID`: one event's story from a running exporter."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TextIO

DEFAULT_EXPORTER = "http://127.0.0.1:9800"


def render(story: dict[str, Any]) -> str:
    """The story as lines an on-call engineer reads."""
    lines = [f"event {story['eventID']}"]
    for published in story["published"]:
        trace = published["trace"]
        lines.append(
            f"  published to {published['topic']} at {published['publishTime']} "
            f"(message {published['messageId']}, trace {trace['traceID']}, "
            f"Options {published['options']})"
        )
        for sub in published["subscriptions"]:
            detail = ""
            if sub["received"]:
                latency = sub.get("deliveryLatencySeconds")
                after = f" ({latency:.3f} s after publish)" if isinstance(latency, float) else ""
                detail = (
                    f", {sub['deliveries']} deliveries, first at {sub['firstReceiveTime']}{after}"
                )
            if sub["deadLettered"]:
                detail += (
                    f", dead-lettered after {sub['deadLettered']['deliveryAttempts']} attempts"
                )
            lines.append(f"    {sub['subscription']}: {sub['verdict']}{detail}: {sub['reason']}")
    return "\n".join(lines)


def main(argv: list[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """0 when the story is printed, 1 when the exporter knows no such event, 2 otherwise."""
    parser = argparse.ArgumentParser(
        prog="eventaudit-exporter lookup",
        description="Where did one event go? Asks a running exporter (GET /api/v1/events/ID).",
    )
    parser.add_argument("event_id", help="the eventID")
    parser.add_argument(
        "--exporter",
        default=os.environ.get("EVENTAUDIT_EXPORTER_URL", DEFAULT_EXPORTER),
        help=f"the exporter's base URL (EVENTAUDIT_EXPORTER_URL; default {DEFAULT_EXPORTER})",
    )
    parser.add_argument("--publish-time", help="epoch ms of its publish time (any hour)")
    parser.add_argument("--json", action="store_true", help="print the JSON answer")
    args = parser.parse_args(argv)
    url = f"{args.exporter.rstrip('/')}/api/v1/events/{urllib.parse.quote(args.event_id, safe='')}"
    if args.publish_time:
        url += "?" + urllib.parse.urlencode({"publishTime": args.publish_time})
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            story = json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            body = json.load(exc)
        except ValueError:
            body = None
        message = body.get("error", exc.reason) if isinstance(body, dict) else exc.reason
        print(f"lookup: {exc.code}: {message}", file=err)
        # 1 only for "no such event" (not a 404 from an exporter without the route).
        return 1 if isinstance(body, dict) and "searched" in body else 2
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"lookup: no usable answer from the exporter at {args.exporter}: {exc}", file=err)
        return 2
    try:
        print(json.dumps(story, indent=2) if args.json else render(story), file=out)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        print(f"lookup: not an event story ({type(exc).__name__}: {exc})", file=err)
        return 2
    return 0
