"""scripts/relayout.py on a clone of this repository's HEAD: every moved module imports at its new path, no
reference to an old path is left, the import-linter block is written, and a second run changes nothing.
(After the re-layout is applied, the first run finds nothing to move and this checks that it stays so.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "relayout.py"


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("relayout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cwd: Path, *args: str) -> str:
    ruff = Path(sys.executable).parent / "ruff"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--ruff", str(ruff), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.mark.slow
def test_relayout_moves_rewrites_and_is_idempotent(tmp_path):
    relayout = _load_script()
    copy = tmp_path / "repo"
    _git(tmp_path, "clone", "--quiet", "--no-hardlinks", str(REPO), str(copy))
    _git(copy, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "--allow-empty", "-m", "base")
    first = _run(copy)
    assert "WARNING" not in first, first  # every top-level module of HEAD is placed
    pkg = copy / relayout.PKG
    entries = [p for p in pkg.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 22, sorted(p.name for p in entries)
    for old, new in relayout.MOVES.items():
        if pkg.joinpath(*new.split(".")).with_suffix(".py").exists():
            assert not (pkg / f"{old}.py").exists(), old

    # every moved module imports at its new path (in the copy, not this checkout)
    modules = [
        f"{relayout.PKG}.{new}"
        for new in relayout.MOVES.values()
        if pkg.joinpath(*new.split(".")).with_suffix(".py").exists()
    ]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    f = importlib.import_module(m).__file__\nprint(f)"
    out = subprocess.run([sys.executable, "-c", code, *modules], cwd=copy, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().startswith(str(copy)), out.stdout[-500:] + out.stderr[-3000:]

    # no text still names an old module path (a line marked `relayout: keep` excepted)
    gone = [old for old in relayout.MOVES if not (pkg / f"{old}.py").exists() and not (pkg / old).is_dir()]
    stale = re.compile(rf"(?<![\w.]){relayout.PKG}[./]({'|'.join(gone)})(?![\w])")
    for name in _git(copy, "ls-files").splitlines():
        path = copy / name
        if path.suffix not in {".py", ".md", ".toml", ".cfg", ".yaml", ".yml", ".sh"} or name == "scripts/relayout.py":
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            assert relayout.KEEP in line or not stale.search(line), f"{name}:{n}: {line}"
    assert relayout.LINT_BEGIN in (copy / "pyproject.toml").read_text()
    assert "lint-imports" in (copy / "Makefile").read_text()

    # a second run on the result changes nothing
    _git(copy, "add", "-A")
    _git(copy, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "--allow-empty", "-m", "relayout")
    second = _run(copy)
    assert "moved 0 module(s) and 0 test file(s); rewrote 0 file(s)" in second, second
    assert _git(copy, "status", "--porcelain") == ""
