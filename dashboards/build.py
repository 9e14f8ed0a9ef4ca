"""`make dashboards`: regenerate dashboards/eventaudit.json from dashboards/eventaudit.py."""

from __future__ import annotations

import sys
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from dashboards import eventaudit

OUTPUT = Path(__file__).with_name("eventaudit.json")


def render() -> str:
    """The dashboard JSON, stable across runs."""
    return JSONEncoder(sort_keys=True, indent=2).encode(eventaudit.build().build()) + "\n"


def main() -> int:
    """Write the JSON; with --check, exit 1 when the committed file is stale."""
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run `make dashboards`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
