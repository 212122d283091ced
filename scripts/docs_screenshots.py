"""Regenerate docs/img/first-hour-*.png from the first-hour end-to-end test's screenshots.

    python scripts/docs_screenshots.py             # run tests/e2e/test_first_hour.py (Airflow 3.3, Chromium,
                                                   # PostgreSQL at BACKFILL_TEST_PG_URL), then copy its PNGs
    python scripts/docs_screenshots.py --from DIR  # copy the PNGs an earlier run left in DIR (E2E_ARTEFACTS=DIR)

`make docs-screenshots` runs the first form with the project's venv and PostgreSQL. Only the files the test
declares (``SCREENSHOTS``) are copied, and only when every one of them is there and is a PNG: the docs never
mix screenshots of two runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS_IMG = REPO / "docs" / "img"
PNG = b"\x89PNG\r\n\x1a\n"


def screenshot_names() -> tuple[str, ...]:
    sys.path.insert(0, str(REPO))
    from tests.e2e.test_first_hour import SCREENSHOTS

    return SCREENSHOTS


def copy_from(folder: Path, names: tuple[str, ...]) -> list[Path]:
    missing = [n for n in names if not (folder / n).is_file() or (folder / n).read_bytes()[:8] != PNG]
    if missing:
        raise SystemExit(f"not in {folder} (or not a PNG): {', '.join(missing)}; did the test pass?")
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(folder / n, DOCS_IMG / n)) for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, help="a folder of screenshots from an earlier run")
    args = parser.parse_args(argv)
    names = screenshot_names()
    if args.source is not None:
        copied = copy_from(args.source, names)
    else:
        with tempfile.TemporaryDirectory(prefix="first-hour-shots-") as folder:
            test = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/e2e/test_first_hour.py"],
                cwd=REPO,
                env={**os.environ, "E2E_ARTEFACTS": folder, "CI": "1"},  # CI: a missing Chromium fails, not skips
            )
            if test.returncode != 0:
                return test.returncode
            copied = copy_from(Path(folder), names)
    for path in copied:
        print(f"{path.relative_to(REPO)}  {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
