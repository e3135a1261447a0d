"""Open a page in headless Chromium and count the images that failed to decode: the check that a report renders.

python tests/browser.py outputs/latest/report.html     # prints "N images, 0 broken", exits 1 if any is broken
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs after every image has loaded or failed: the page's title becomes the count, read back from the DOM dump.
COUNT_IMAGES = (
    "<script>window.addEventListener('load',()=>{const i=[...document.images];"
    "document.title='IMAGES '+i.length+' BROKEN '+i.filter(x=>!(x.complete&&x.naturalWidth>0)).length;});</script>"
)


def chromium() -> str | None:
    """The Chromium executable, if this machine has one."""
    return next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
    )


def dom_of(url: str, budget_ms: int = 20_000) -> str:
    """The DOM of a page once its scripts have run for `budget_ms` of virtual time."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                chromium(),
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout


def image_counts(page: Path) -> tuple[int, int]:
    """(images, broken images) of an HTML page, as Chromium loads it from beside the original (relative links work)."""
    text = page.read_text()
    probe = page.with_name(f".browser-check-{page.name}")
    probe.write_text(text.replace("</body>", COUNT_IMAGES + "</body>") if "</body>" in text else text + COUNT_IMAGES)
    try:
        dom = dom_of(probe.resolve().as_uri(), budget_ms=10_000)
    finally:
        probe.unlink()
    found = re.search(r"<title>IMAGES (\d+) BROKEN (\d+)</title>", dom)
    if not found:
        raise RuntimeError(f"Chromium did not run the page's check script on {page}")
    return int(found.group(1)), int(found.group(2))


if __name__ == "__main__":
    if chromium() is None:
        sys.exit("no Chromium on this machine (Debian: apt-get install chromium)")
    images, broken = image_counts(Path(sys.argv[1]))
    print(f"{images} images, {broken} broken")
    sys.exit(1 if broken or not images else 0)
