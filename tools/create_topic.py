"""`python -m tools.create_topic TOPIC SUBSCRIPTION... [--push SUBSCRIPTION=URL ...]`: create
them (idempotent); `--push` ones are push subscriptions delivering to URL."""

from __future__ import annotations

import argparse
import os

from tools.stack import create_topic


def _push(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not (sep and name and url.startswith(("http://", "https://"))):
        raise argparse.ArgumentTypeError(f"not SUBSCRIPTION=http(s)://URL: {text!r}")
    return name, url


def main(argv: list[str] | None = None) -> int:
    """Create the topic and subscriptions named on the command line."""
    parser = argparse.ArgumentParser(prog="python -m tools.create_topic", description=__doc__)
    parser.add_argument("topic")
    parser.add_argument("subscriptions", nargs="*")
    parser.add_argument("--push", type=_push, action="append", default=[])
    args = parser.parse_args(argv)
    project = os.environ.get("EVENTAUDIT_PROJECT", "eventaudit-local")
    push = dict(args.push)
    create_topic(project, args.topic, args.subscriptions, push)
    named = [*args.subscriptions, *(f"{s} (push to {u})" for s, u in push.items())]
    print(f"topic {args.topic} with subscriptions {', '.join(named) or '(none)'} in {project}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
