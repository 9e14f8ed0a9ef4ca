"""`python -m tools.create_topic TOPIC SUBSCRIPTION...`: create them (idempotent)."""

from __future__ import annotations

import os
import sys

from tools.stack import create_topic


def main() -> int:
    """Create the topic and subscriptions named on the command line."""
    if len(sys.argv) < 2:
        print("usage: python -m tools.create_topic TOPIC [SUBSCRIPTION...]", file=sys.stderr)
        return 2
    project = os.environ.get("EVENTAUDIT_PROJECT", "eventaudit-local")
    create_topic(project, sys.argv[1], sys.argv[2:])
    print(
        f"topic {sys.argv[1]} with subscriptions {', '.join(sys.argv[2:]) or '(none)'} in {project}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
