"""False misses in a no-fault `make run`: start the stack (its own ports and data), and every
5 s ask the exporter which events the healthy subscription (`create-user-audit`, no fault
knob) missed in each window; each listed event whose receipt was stored before its bucket
settled (bucket end + settle delay) is a false miss. Prints one line per sample with a miss,
and a summary. The goal is zero.

    python -m bench.false_misses --minutes 30
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pymongo import MongoClient

from tools.run import PORTS, SUBSCRIPTIONS, TOPIC

HEALTHY = SUBSCRIPTIONS[0]
BUCKET = timedelta(seconds=10)
SETTLE = timedelta(seconds=30)


def _get(url: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return dict(json.load(answer))
    except (OSError, ValueError):
        return None


def _receipt_time(db: object, event_id: str, published: datetime) -> datetime | None:
    ms = int(published.timestamp() * 1000)
    hour = ms - ms % 3_600_000
    doc = db[f"ReceivedRecord_{hour}"].find_one({"_id": f"{HEALTHY}|{event_id}"})  # type: ignore[index]
    return None if doc is None else doc["createdTime"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--port-offset", type=int, default=300)
    args = parser.parse_args()
    offset = args.port_offset
    data = Path("data/false-misses")
    command = [sys.executable, "-m", "tools.run", "--duration", str(args.minutes * 60 + 60)]
    command += ["--port-offset", str(offset), "--data-dir", str(data)]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    exporter = f"http://127.0.0.1:{PORTS['exporter'] + offset}"
    client: MongoClient[dict[str, object]] = MongoClient(
        f"mongodb://127.0.0.1:{PORTS['ferretdb'] + offset}/", tz_aware=True
    )
    db = client["eventaudit"]
    samples = with_misses = false = 0
    seen_false: set[str] = set()
    deadline = time.monotonic() + args.minutes * 60
    try:
        while time.monotonic() < deadline and run.poll() is None:
            time.sleep(5)
            for window in ("1m", "5m"):
                answer = _get(
                    f"{exporter}/api/v1/missed?topic={TOPIC}&subscription={HEALTHY}"
                    f"&window={window}&limit=1000"
                )
                if answer is None:
                    continue
                samples += 1
                events = list(answer.get("events", []))  # type: ignore[call-overload]
                if not events:
                    continue
                with_misses += 1
                for event in events:
                    published = datetime.fromisoformat(event["publishTime"])
                    ms = int(published.timestamp() * 1000)
                    end = datetime.fromtimestamp((ms - ms % 10_000) / 1000, UTC) + BUCKET
                    stored = _receipt_time(db, event["eventID"], published)
                    verdict = "lost"
                    if stored is not None and stored < end + SETTLE:
                        verdict = "FALSE MISS"
                        false += 1
                        seen_false.add(event["eventID"])
                    elif stored is not None:
                        verdict = "late receipt"
                    print(f"{datetime.now(UTC):%H:%M:%S} {window} {event['eventID']} {verdict}")
    finally:
        run.terminate()
        run.wait(timeout=300)
        client.close()
    print(
        f"{samples} samples of {HEALTHY} over {args.minutes:g} min: {with_misses} with a missed "
        f"event, {false} false-miss listings ({len(seen_false)} events)"
    )
    return 0 if false == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
