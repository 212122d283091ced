#!/usr/bin/env bash
# Build the sdist and the wheel, check them (twine check --strict, the files they must hold), install the wheel
# into a fresh virtualenv with the Airflow 3.3 pins (requirements/airflow-3.3.txt, as constraints) and check that
# Airflow sees the provider (`airflow providers list`) and loads its plugin (`airflow plugins`).
# Called by .ci/run and `make wheel-check`. Nothing is installed outside a temporary folder (removed at the end;
# KEEP=1 keeps it and prints its path). PYTHON: the interpreter for the venvs (build and twine come from its
# environment when it has them, else from a temporary venv). Needs the package index; no database.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wheel-check.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then trap 'echo "kept: $WORK"' EXIT; else trap 'rm -rf "$WORK"' EXIT; fi
step() { printf '== %s (%ss)\n' "$1" "$SECONDS"; }
fail() { echo "wheel check FAILED: $*" >&2; exit 1; }

step "build and twine"
TOOLS=$PYTHON
if ! "$PYTHON" -c 'import build, twine' 2>/dev/null; then
    "$PYTHON" -m venv "$WORK/tools"
    "$WORK/tools/bin/pip" install -q build twine >"$WORK/tools.log" 2>&1 || { cat "$WORK/tools.log"; fail "pip install build twine"; }
    TOOLS=$WORK/tools/bin/python
fi

step "python -m build (sdist + wheel, isolated)"
"$TOOLS" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; fail "python -m build"; }
WHEEL=$(ls "$WORK"/dist/*.whl)
SDIST=$(ls "$WORK"/dist/*.tar.gz)
"$TOOLS" -m twine check --strict "$WORK"/dist/*

step "files in the wheel and the sdist"
# every file of the package in git (modules, py.typed, any template or static file) must be in both
"$TOOLS" - "$WHEEL" "$SDIST" <<'EOF'
import subprocess, sys, tarfile, zipfile

wheel, sdist = sys.argv[1:3]
tracked = set(subprocess.run(["git", "ls-files", "airflow_backfill_provider"], check=True, capture_output=True,
                             text=True).stdout.split())
in_wheel = set(zipfile.ZipFile(wheel).namelist())
with tarfile.open(sdist) as t:
    root = t.getnames()[0].split("/")[0]
    in_sdist = {n.removeprefix(root + "/") for n in t.getnames()}
problems = [f"not in the wheel: {f}" for f in sorted(tracked - in_wheel)]
problems += [f"not in the sdist: {f}" for f in sorted(tracked - in_sdist)]
problems += [f"in the wheel but not in git: {f}" for f in sorted(in_wheel)
             if f.startswith("airflow_backfill_provider/") and f not in tracked]
meta = [n for n in in_wheel if n.endswith(".dist-info/entry_points.txt")]
eps = zipfile.ZipFile(wheel).read(meta[0]).decode() if meta else ""
for needed in ("[apache_airflow_provider]", "[airflow.plugins]", "airflow_backfill_provider.ui.plugin:"):
    if needed not in eps:
        problems.append(f"entry point missing in the wheel: {needed}")
if "airflow_backfill_provider/py.typed" not in in_wheel:
    problems.append("py.typed not in the wheel")
print(f"wheel: {len(in_wheel)} files, sdist: {len(in_sdist)} entries; {len(tracked)} package files in git")
if problems:
    sys.exit("\n".join(problems))
EOF

step "fresh venv: the wheel with the Airflow 3.3 pins"
# requirements/airflow-3.3.txt as constraints (pip refuses extras in a constraints file: dropped)
sed -E 's/\[[^]]*\]//' requirements/airflow-3.3.txt >"$WORK/constraints.txt"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$WHEEL" -c "$WORK/constraints.txt" >"$WORK/install.log" 2>&1 ||
    { cat "$WORK/install.log"; fail "pip install of the wheel"; }
"$WORK/venv/bin/pip" check

step "airflow providers list / airflow plugins"
export AIRFLOW_HOME=$WORK/airflow_home AIRFLOW__CORE__LOAD_EXAMPLES=False
cd "$WORK"  # not the checkout: the installed wheel is what is imported
"$WORK/venv/bin/airflow" version
"$WORK/venv/bin/airflow" providers list -o plain >"$WORK/providers.txt" 2>"$WORK/providers.err" ||
    { cat "$WORK/providers.err"; fail "airflow providers list"; }
grep -E '^airflow-backfill-provider[[:space:]]' "$WORK/providers.txt" ||
    { cat "$WORK/providers.txt" "$WORK/providers.err"; fail "airflow providers list does not show airflow-backfill-provider"; }
"$WORK/venv/bin/airflow" plugins -o plain >"$WORK/plugins.txt" 2>"$WORK/plugins.err" ||
    { cat "$WORK/plugins.err"; fail "airflow plugins"; }
grep -E '^backfill_provider[[:space:]]' "$WORK/plugins.txt" ||
    { cat "$WORK/plugins.txt" "$WORK/plugins.err"; fail "airflow plugins does not list backfill_provider"; }
# the plugin must load, not only be listed: no import error for it
if grep -i -E 'failed to import plugin|error.*backfill_provider' "$WORK/plugins.err"; then fail "plugin import error"; fi
"$WORK/venv/bin/python" -c 'import airflow_backfill_provider as p, os; assert "site-packages" in p.__file__, p.__file__; print("imported from", os.path.dirname(p.__file__))'
step "wheel check passed: $(basename "$WHEEL"), $(basename "$SDIST")"
