"""Headless Chromium (Debian's `chromium`, installed by tools/setup.sh) for the status page's
browser test and the README's screenshot.

    python -m tools.chromium screenshot http://127.0.0.1:9800/ docs/status-page.png 1400 1000
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Without the networking flags Chromium reaches for Google's hosts at every start, which this
# machine's closed network refuses; a fresh profile keeps runs independent.
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def binary() -> str:
    """The Chromium executable; RuntimeError naming the fix when it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("chromium is missing: run `make setup` (apt-get install chromium)")
    return found


def _run(args: list[str], timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            [binary(), *_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(url: str, width: int = 1400, height: int = 1000, timeout: float = 60) -> str:
    """The DOM of `url` after the page loaded and ran, serialized."""
    return _run([f"--window-size={width},{height}", "--dump-dom", url], timeout)


def screenshot(url: str, path: Path, width: int, height: int, timeout: float = 60) -> None:
    """A PNG of `url` at that window size."""
    _run([f"--window-size={width},{height}", f"--screenshot={path}", url], timeout)
    if not path.exists():
        raise RuntimeError(f"chromium wrote no screenshot at {path}")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    header = path.read_bytes()[:24]
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "screenshot":
        sys.exit("usage: python -m tools.chromium screenshot URL PATH WIDTH HEIGHT")
    screenshot(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    print(f"wrote {sys.argv[3]} {png_size(Path(sys.argv[3]))}")
