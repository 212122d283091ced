#!/usr/bin/env python3
"""Lay airflow_backfill_provider/ out by stage (issue 22, item 3): a pure move, applied by this script.

    python scripts/relayout.py [--dry-run] [--map OLD=NEW ...] [--ruff PATH] [--allow-dirty]

From the repository root of a clean work tree. It

1. moves the flat modules into stage subpackages with ``git mv`` (MOVES below), and the flat test files into
   folders that mirror them (TEST_DIRS; ``tests/e2e``, ``tests/faults`` and the shared helpers stay);
2. rewrites every reference in the tracked text files: ``airflow_backfill_provider.X`` (imports, mock and
   monkeypatch targets, logger names, entry points, docs), ``from airflow_backfill_provider import X``,
   relative imports, ``airflow_backfill_provider/X.py`` and bare ``X.py`` mentions, ``tests/test_x.py`` and
   ``tests.test_x``, and the ``__file__``-relative paths of the moved tests (one folder deeper);
3. writes the import-linter contracts (pyproject.toml, between markers), ``lint-imports`` in ``make lint``,
   the layout table of CONTRIBUTING.md (one line per subpackage), and formats the tree with ruff.

What stays where it is, on purpose: paths users' DAG files import (``loader``, ``configcheck``, ``factory``,
``live``: README, docs), class paths Airflow stores (``operators/`` in serialized DAGs, ``triggers/`` in
trigger rows, ``timetables.BackfillOnlyTimetable`` in serialized DAGs), the plugin's entry point (``ui/``),
``connections.py`` and ``python -m airflow_backfill_provider``. tests/test_kept_paths.py checks them.

A line holding ``relayout: keep`` is never rewritten (e.g. a lock key that merely looks like a module path).

Re-running is safe: a module already moved is not moved again and nothing is rewritten twice; a stale
reference to a moved module (a branch merged after the re-layout) is rewritten where it is unambiguous. A
top-level module this script does not know is left where it is, with a warning: add it to MOVES (or pass
``--map name=stage.name``) and run again.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import shutil
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

PKG = "airflow_backfill_provider"

#: the stages, lowest first (a stage may import the ones before it, never a later one), and what each holds.
#: kind "package": a subpackage; "module": one module that stays a top-level module (its path is public or
#: one module is the whole stage).
STAGES: list[tuple[str, str, str]] = [
    (
        "core",
        "package",
        "the vocabulary every stage shares: the spec, chunks and the rule for their SQL bounds, every SQL text, "
        "the provider tables' DDL, exception types, transient vs permanent errors, interrupts, client-side "
        "deadlines, DSNs, and the only module that checks Airflow's version (compat)",
    ),
    (
        "connections",
        "module",
        "psycopg2 sessions from Airflow connection ids (PostgresHook's resolution), settings pinned; "
        "open_source/open_destination from a spec; application_name",
    ),
    ("ledger", "package", "the ledger table (one row per committed chunk) and the coverage of its ranges"),
    (
        "prepare",
        "package",
        "what a run reads and writes, from both catalogs: table shapes (catalog), casts, schema drift, what a "
        "range reads (source), the backfill's identity, catalog facts, the live watermark (read only), the "
        "swap-mode parallel table and its merge",
    ),
    (
        "plan",
        "package",
        "from a DAG run to chunk descriptors: range, watermark clip and pre-flight checks (planning, checks); "
        "calendar, auto-sized and key-range cuts; catalog statistics; resume; batches",
    ),
    (
        "throttle",
        "package",
        "when a chunk may read the source: load probe, go/wait/critical, pacing and the read watch (probe); "
        "the server-wide latency signal; maintenance windows; VACUUM/ANALYZE waits",
    ),
    (
        "transfer",
        "package",
        "one chunk: source COPY -> pipe -> staging -> newer-wins upsert -> ledger row in one transaction "
        "(chunk), first load straight in, cast and encoding diagnostics",
    ),
    ("live", "module", "live ingest, the only writer of the watermark"),
    ("validate", "module", "per-day counts, sums and checksums, source vs destination; the report and summary row"),
    (
        "observe",
        "package",
        "the progress read model, log lines and failure reasons, OpenLineage facets, the asset event, the "
        "metadata reads behind the page and `status`",
    ),
]

#: the Airflow surface, above every stage: operators and triggers (their class paths are stored), the
#: plugin, the DAG builders users import, the timetable (stored class path), the status command
SURFACE: list[tuple[str, str]] = [
    ("operators", "the operators (thin: they call the stages); a chunk's gates and its state between deferrals"),
    ("triggers", "deferred waits in the triggerer: source load, pacing turn, VACUUM/ANALYZE"),
    ("ui", "the Airflow plugin: progress page (FastAPI app, external views), timetable registration"),
    ("factory", "build_backfill_dag(spec): a spec in, a backfill DAG out (parse-time cheap)"),
    (
        "live_factory",
        "build_live_dag(spec): the live-ingest DAG; apart from factory.py so no backfill module reaches the writer",
    ),
    ("loader", "DAGs from YAML files (README quick start)"),
    ("configcheck", "every broken config as one import error, from a DAG file of its own"),
    ("timetables", "the backfill-only timetable (its class path is stored in serialized DAGs)"),
    ("assets", "destination_asset(spec): the asset the validate task emits, for downstream schedules (docs)"),
    ("__main__", "`python -m airflow_backfill_provider status`"),
]

#: old top-level module -> new dotted name under the package
MOVES: dict[str, str] = {
    # core
    "spec": "core.spec",
    "chunks": "core.chunks",
    "timebounds": "core.timebounds",
    "sql": "core.sql",
    "ddl": "core.ddl",
    "exceptions": "core.exceptions",
    "errors": "core.errors",
    "interrupts": "core.interrupts",
    "deadlines": "core.deadlines",
    "dsn": "core.dsn",
    "compat": "core.compat",
    # ledger
    "ledger": "ledger.table",
    "coverage": "ledger.coverage",
    # prepare
    "schema": "prepare.catalog",
    "casts": "prepare.casts",
    "drift": "prepare.drift",
    "source": "prepare.source",
    "identity": "prepare.identity",
    "facts": "prepare.facts",
    "watermark": "prepare.watermark",
    "swap": "prepare.swap",
    # plan
    "planning": "plan.planning",
    "checks": "plan.checks",
    "chunkplan": "plan.chunkplan",
    "keyranges": "plan.keyranges",
    "sizing": "plan.sizing",
    "sourcestats": "plan.sourcestats",
    "batches": "plan.batches",
    # throttle
    "throttle": "throttle.probe",
    "loadsignal": "throttle.loadsignal",
    "windows": "throttle.windows",
    "maintenance": "throttle.maintenance",
    # transfer
    "transfer": "transfer.chunk",
    "pipe": "transfer.pipe",
    "upsert": "transfer.upsert",
    "firstload": "transfer.firstload",
    "castcheck": "transfer.castcheck",
    "encoding": "transfer.encoding",
    # observe
    "progress": "observe.progress",
    "progress_log": "observe.progress_log",
    "lineage": "observe.lineage",
    "airflow_state": "observe.airflow_state",
}

#: top-level entries that stay (see the module docstring)
STAY = {"__init__", "__main__", "py.typed"} | {s for s, kind, _ in STAGES if kind == "module"} | {s for s, _ in SURFACE}

#: flat test file (stem) -> folder under tests/ mirroring the package; "" = stays in tests/ (tests of the
#: top-level modules, whole DAGs, packaging and the test harness itself)
TEST_DIRS: dict[str, str] = {
    **dict.fromkeys(["test_chunks", "test_spec", "test_errors", "test_timebounds", "test_stall"], "core"),
    **dict.fromkeys(["test_ledger_ranges", "test_coverage"], "ledger"),
    **dict.fromkeys(
        [
            "test_drift",
            "test_lossy_casts",
            "test_facts",
            "test_prepared",
            "test_backfill_identity",
            "test_swap",
            "test_swap_ownership",
            "test_unique_keys",
            "test_watermark_rule",
        ],
        "prepare",
    ),
    **dict.fromkeys(
        [
            "test_planning",
            "test_keyranges",
            "test_keyranges_edges",
            "test_sizing",
            "test_sampled_stats",
            "test_batches",
            "test_exact_cover",
            "test_time_plan",
        ],
        "plan",
    ),
    **dict.fromkeys(
        ["test_throttle", "test_load_look", "test_load_signal", "test_read_watch", "test_windows"], "throttle"
    ),
    **dict.fromkeys(
        [
            "test_transfer",
            "test_firstload",
            "test_castcheck_time",
            "test_pipe_signals",
            "test_type_matrix",
            "test_type_matrix_hostile",
            "test_equality_matrix",
            "test_cross_major",
            "test_conflict_policy",
            "test_time_matrix",
        ],
        "transfer",
    ),
    **dict.fromkeys(["test_live", "test_live_time", "test_null_cursor", "test_race"], "live"),
    **dict.fromkeys(
        [
            "test_validate",
            "test_validate_checksum",
            "test_validate_nonfinite",
            "test_validate_slices",
            "test_validate_time",
            "test_validate_types",
            "test_validate_dag",
        ],
        "validate",
    ),
    **dict.fromkeys(
        [
            "test_progress",
            "test_progress_backfills",
            "test_progress_log",
            "test_lineage",
            "test_assets",
            "test_status_cli",
        ],
        "observe",
    ),
    **dict.fromkeys(["test_chunk_operator_alone", "test_throttle_operator"], "operators"),
    "test_plugin": "ui",
    **dict.fromkeys(
        [
            "test_loader",
            "test_timetables",
            "test_dag_run",
            "test_green_means_verified",
            "test_provider",
            "test_compose",
            "test_bench_smoke",
            "test_pg_urls",
            "test_sessions",
            "test_kept_paths",
            "test_connections_seam",
            "test_relayout",
        ],
        "",
    ),
}

#: spec -> core.spec -> the spec checks the windows syntax with the gate's own parser (one grammar, lazily)
IGNORED_IMPORTS = [
    (
        "core.spec",
        "throttle.windows",
        "the spec validates `windows:` with the gate's own parser, so the two never disagree (lazy import)",
    ),
]

#: stages side by side in one layer: neither may import the other
INDEPENDENT = ("live", "validate")

#: the backfill path must never reach the watermark writer (tests/.../test_watermark_rule.py checks it too)
WRITERS = ["live", "live_factory", "operators.live"]
BACKFILL_PATH = ["core", "connections", "ledger", "prepare", "plan", "throttle", "transfer", "factory", "loader"]
BACKFILL_OPERATORS = ["operators.plan", "operators.chunk", "operators.merge", "operators.validate"]

TEXT_SUFFIXES = {".py", ".md", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".sh", ".txt", ".rst"}
TEXT_NAMES = {"Makefile", "Dockerfile", "run"}
KEEP = "relayout: keep"
LINT_BEGIN = "# --- import-linter: stage layers (written by scripts/relayout.py; edit STAGES there) ---"
LINT_END = "# --- end import-linter ---"


class Relayout:
    def __init__(self, root: Path, moves: dict[str, str], dry_run: bool, ruff: str | None):
        self.root = root
        self.pkg = root / PKG
        self.moves = moves
        self.dry_run = dry_run
        self.ruff = ruff
        self.warnings: list[str] = []
        self.moved_now: dict[str, str] = {}  # old -> new, moved in this run
        self.tests_now: dict[str, str] = {}  # test stem -> folder, moved in this run
        self.changed: set[Path] = set()

    # --- helpers ---------------------------------------------------------------------------------------
    def warn(self, text: str) -> None:
        self.warnings.append(text)
        print(f"WARNING: {text}")

    def git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.root, check=True, capture_output=True, text=True).stdout

    def new_path(self, new: str) -> Path:
        return self.pkg.joinpath(*new.split(".")).with_suffix(".py")

    def top_level(self) -> list[str]:
        return sorted(p.name for p in self.pkg.iterdir() if p.name != "__pycache__" and not p.name.startswith("."))

    # --- 1. moves --------------------------------------------------------------------------------------
    def plan_moves(self) -> None:
        stages = {s for s, kind, _ in STAGES if kind == "package"}
        for old, new in self.moves.items():
            src, dst = self.pkg / f"{old}.py", self.new_path(new)
            if src.exists() and dst.exists():
                sys.exit(f"both {src.relative_to(self.root)} and {dst.relative_to(self.root)} exist: resolve by hand")
            if src.exists():
                self.moved_now[old] = new
        for entry in self.top_level():
            name = entry.removesuffix(".py")
            if entry.endswith(".py") and name not in self.moves and name not in STAY:
                if name in stages:
                    sys.exit(f"{entry} has the name of a stage package: map it (--map {name}={name}.<module>)")
                self.warn(
                    f"{PKG}/{entry}: not in MOVES, left at the top level and outside the layer contract; "
                    f"add it to MOVES in scripts/relayout.py (or --map {name}=<stage>.{name}) and run again"
                )
        for test in sorted((self.root / "tests").glob("test_*.py")):
            folder = TEST_DIRS.get(test.stem)
            if folder is None:
                folder = self.guess_test_dir(test.stem)
                if folder is None:
                    self.warn(f"tests/{test.name}: no folder for it in TEST_DIRS; left in tests/")
                    continue
                print(f"note: tests/{test.name} -> tests/{folder + '/' if folder else ''} (guessed from its name)")
            if folder:
                self.tests_now[test.stem] = folder

    def guess_test_dir(self, stem: str) -> str | None:
        """tests/test_<module>[_more].py -> the folder of <module>'s stage ("" for a top-level module)."""
        words = stem.removeprefix("test_").split("_")
        for n in range(len(words), 0, -1):
            name = "_".join(words[:n])
            if name in self.moves:
                return self.moves[name].split(".")[0]
            if name in STAY:
                return ""
            for new in self.moves.values():
                if new.split(".")[-1] == name:
                    return new.split(".")[0]
        return None

    def apply_moves(self) -> None:
        for old, new in sorted(self.moved_now.items()):
            dst = self.new_path(new)
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.git("mv", f"{PKG}/{old}.py", str(dst.relative_to(self.root)))
        doc = {s: d for s, _, d in STAGES}
        for folder in sorted({new.split(".")[0] for new in self.moves.values()}):
            init = self.pkg / folder / "__init__.py"
            if (self.pkg / folder).is_dir() and not init.exists():
                body = textwrap.fill(_sentence(doc.get(folder, folder)), 114, subsequent_indent="")
                init.write_text(f'"""{body}"""\n')
                self.git("add", str(init.relative_to(self.root)))
        for stem, folder in sorted(self.tests_now.items()):
            (self.root / "tests" / folder).mkdir(exist_ok=True)
            init = self.root / "tests" / folder / "__init__.py"
            if not init.exists():
                init.write_text(f'"""Tests of {PKG}/{folder}/ (see CONTRIBUTING.md, Layout)."""\n')
                self.git("add", str(init.relative_to(self.root)))
            self.git("mv", f"tests/{stem}.py", f"tests/{folder}/{stem}.py")

    # --- 2. references -----------------------------------------------------------------------------------
    def rewrite_all(self) -> None:
        files = [self.root / f for f in self.git("ls-files").splitlines()]
        here = Path(__file__).resolve()
        for path in files:
            if not path.is_file() or path.resolve() == here:
                continue
            if path.suffix not in TEXT_SUFFIXES and path.name not in TEXT_NAMES:
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            # dotted names first: the statements split out of `from PKG import a, b` below are already new
            new = self.rewrite_text(text)
            if path.suffix == ".py":
                new = self.rewrite_imports(new, path)
                if path.parent.name in set(self.tests_now.values()) and path.stem in self.tests_now:
                    new = self.deeper_file_paths(new, path)
            if new != text:
                path.write_text(new)
                self.changed.add(path)

    def rewrite_imports(self, text: str, path: Path) -> str:
        """`from PKG import a, b as c`: one statement per moved module (ast positions, so multi-line ones too)."""
        tree = self.parse(text, path)
        if tree is None:
            return text
        edits = []
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == PKG):
                continue
            kept, by_parent = [], {}
            for alias in node.names:
                new = self.moves.get(alias.name)
                if new is None or not self.is_stale(alias.name):
                    kept.append(alias)
                    continue
                parent, _, base = new.rpartition(".")
                local = alias.asname or alias.name
                by_parent.setdefault(parent, []).append(base + (f" as {local}" if local != base else ""))
            if by_parent:
                stmts = [f"from {PKG} import {_names(kept)}"] if kept else []
                stmts += [
                    f"from {PKG}.{parent} import {', '.join(sorted(by_parent[parent]))}" for parent in sorted(by_parent)
                ]
                edits.append((node, stmts))
        return _replace_statements(text, edits)

    def absolutize_relative(self) -> None:
        """Relative imports in the package become absolute before anything moves (they are relative to the old place)."""
        for path in sorted(self.pkg.rglob("*.py")):
            text = path.read_text()
            tree = self.parse(text, path)
            if tree is None:
                continue
            parts = list(path.relative_to(self.root).with_suffix("").parts)
            package = parts[:-1]  # the package a relative import starts from (the same for __init__.py)
            edits = []
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package[: len(package) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                    edits.append((node, [f"from {module} import {_names(node.names)}"]))
            if edits:
                path.write_text(_replace_statements(text, edits))
                self.changed.add(path)

    def parse(self, text: str, path: Path) -> ast.Module | None:
        try:
            return ast.parse(text)
        except SyntaxError as err:
            self.warn(f"{path.relative_to(self.root)}: not parsed ({err}); its imports were rewritten as text only")
            return None

    def is_stale(self, old: str) -> bool:
        """A reference to `old` is to the old top-level module: moved now, or gone and not a package name now."""
        if old in self.moved_now:
            return True
        return not (self.pkg / f"{old}.py").exists() and not (self.pkg / old).is_dir()

    def rewrite_text(self, text: str) -> str:
        names = sorted((old for old in self.moves if self.is_stale(old)), key=len, reverse=True)
        tests = sorted(self.tests_now, key=len, reverse=True)
        if not names and not tests:
            return text
        dotted = re.compile(rf"(?<![\w.]){PKG}\.({'|'.join(names)})(?![\w])") if names else None
        path_re = re.compile(rf"(?<![\w.]){PKG}/({'|'.join(names)})\.py(?![\w])") if names else None
        bare_re = re.compile(rf"(?<![\w/.\-])({'|'.join(names)})\.py(?![\w])") if names else None
        test_path = re.compile(rf"(?<![\w])tests/({'|'.join(tests)})\.py(?![\w])") if tests else None
        test_mod = re.compile(rf"(?<![\w.])tests\.({'|'.join(tests)})(?![\w])") if tests else None

        def dotted_sub(m: re.Match) -> str:
            return f"{PKG}.{self.moves[m.group(1)]}"

        out = []
        for line in text.splitlines(keepends=True):
            if KEEP in line:
                out.append(line)
                continue
            if dotted:
                line = dotted.sub(dotted_sub, line)
                line = path_re.sub(lambda m: f"{PKG}/{self.moves[m.group(1)].replace('.', '/')}.py", line)
                line = bare_re.sub(lambda m: f"{self.moves[m.group(1)].replace('.', '/')}.py", line)
            if test_path:
                line = test_path.sub(lambda m: f"tests/{self.tests_now[m.group(1)]}/{m.group(1)}.py", line)
                line = test_mod.sub(lambda m: f"tests.{self.tests_now[m.group(1)]}.{m.group(1)}", line)
            out.append(line)
        return "".join(out)

    def deeper_file_paths(self, text: str, path: Path) -> str:
        """A moved test is one folder deeper: paths built from its __file__ (in code, not in strings) follow."""
        rel = path.relative_to(self.root)
        rules = [
            (
                r"(Path\(__file__\)(?:\.resolve\(\))?\.parents\[)(\d+)\]",
                lambda m: f"{m.group(1)}{int(m.group(2)) + 1}]",
            ),
            (r"Path\(__file__\)(?:\.resolve\(\))?(?:\.parent(?![s\w]))+", lambda m: m.group(0) + ".parent"),
            (r"os\.path\.dirname\(__file__\)", lambda m: "os.path.dirname(os.path.dirname(__file__))"),
        ]
        done: list[int] = []  # lines a rule rewrote
        for pattern, repl in rules:
            spans = _string_spans(text)
            if spans is None:
                self.warn(f"{rel}: not tokenized; check its __file__ paths by hand (it is one folder deeper now)")
                return text
            pieces, last = [], 0
            for m in re.finditer(pattern, text):
                if any(a <= m.start() < b for a, b in spans):
                    continue
                pieces += [text[last : m.start()], repl(m)]
                last = m.end()
                done.append(text.count("\n", 0, m.start()) + 1)
            text = "".join(pieces) + text[last:]
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NAME and tok.string == "__file__" and tok.start[0] not in done:
                self.warn(
                    f"{rel}:{tok.start[0]}: a path from __file__ the script does not know (one folder deeper now)"
                )
        return text

    # --- 3. config, docs, format -----------------------------------------------------------------------
    def write_import_linter(self) -> None:
        present = {p.name.removesuffix(".py") for p in self.pkg.iterdir()}
        layers = [" : ".join(s for s, _ in SURFACE if s in present)]  # ":" siblings may import each other
        for name in reversed([s for s, _, _ in STAGES if s in present]):  # highest first
            if name in INDEPENDENT:  # "|": independent siblings, neither imports the other
                group = " | ".join(n for n in INDEPENDENT if n in present)
                if group not in layers:
                    layers.append(group)
            else:
                layers.append(name)

        def q(items):
            return "[\n" + "".join(f'    "{i}",\n' for i in items) + "]"

        ignored = "[\n" + "".join(f'    "{PKG}.{a} -> {PKG}.{b}",  # {why}\n' for a, b, why in IGNORED_IMPORTS) + "]"
        sources = [
            f"{PKG}.{m}"
            for m in BACKFILL_PATH + BACKFILL_OPERATORS
            if (self.pkg / m.replace(".", "/")).exists() or self.new_path(m).exists()
        ]
        block = f"""{LINT_BEGIN}
# `make lint` runs `lint-imports`. Layers, highest first: the Airflow surface (its members may import each
# other), then the stages; a stage may import the ones below it, never one above (CONTRIBUTING.md, Layout).
[tool.importlinter]
root_package = "{PKG}"
exclude_type_checking_imports = true

[[tool.importlinter.contracts]]
id = "stages"
name = "No stage imports a later one"
type = "layers"
containers = ["{PKG}"]
layers = {q(layers)}
ignore_imports = {ignored}

[[tool.importlinter.contracts]]
id = "watermark-writer"
name = "The backfill path never reaches the watermark writer"
type = "forbidden"
source_modules = {q(sources)}
forbidden_modules = {q(f"{PKG}.{w}" for w in WRITERS)}
{LINT_END}
"""
        pyproject = self.root / "pyproject.toml"
        text = pyproject.read_text()
        if LINT_BEGIN in text:
            a, b = text.index(LINT_BEGIN), text.index(LINT_END) + len(LINT_END) + 1
            text = text[:a] + block + text[b:]
        else:
            text = text.rstrip("\n") + "\n\n" + block
        self.write(pyproject, text)
        makefile = self.root / "Makefile"
        text = makefile.read_text()
        if "lint-imports" not in text:
            new = text.replace("\t$(VENV)/bin/mypy\n", "\t$(VENV)/bin/mypy\n\t$(VENV)/bin/lint-imports\n", 1)
            if new == text:
                self.warn("Makefile: no `$(VENV)/bin/mypy` line in the lint target; add `lint-imports` by hand")
            self.write(makefile, new)
        for doc, old, new in [
            (".ci/run", "mypy (seconds)", "mypy, lint-imports (seconds)"),
            (
                "CONTRIBUTING.md",
                "mypy on the package, and",
                "mypy on the package, the stage layers (`lint-imports`), and",
            ),
            ("CONTRIBUTING.md", "`make lint` is the first three", "`make lint` is the first four"),
        ]:
            path = self.root / doc
            text = path.read_text()
            if new not in text:
                if old in text:
                    self.write(path, text.replace(old, new, 1))
                else:
                    self.warn(f"{doc}: {old!r} not found; mention lint-imports there by hand")

    def write_layout(self) -> None:
        rows = ["| entry | what |", "|---|---|"]
        for name, kind, what in STAGES:
            if kind == "package":
                mods = sorted(p.stem for p in (self.pkg / name).glob("*.py") if p.stem != "__init__")
                rows.append(f"| `{name}/` | {what}: " + ", ".join(f"`{m}`" for m in mods) + " |")
            else:
                rows.append(f"| `{name}.py` | {what} |")
        for name, what in SURFACE:
            entry = f"`{name}/`" if (self.pkg / name).is_dir() else f"`{name}.py`"
            rows.append(f"| {entry} | {what} |")
        others = [
            p
            for p in self.top_level()
            if p.removesuffix(".py") not in STAY and p.removesuffix(".py") not in {s for s, _, _ in STAGES}
        ]
        for entry in others:
            rows.append(f"| `{entry}` | (not placed in a stage yet) |")
        intro = (
            "The package is laid out by stage, in the order data flows and imports go: a stage may import the ones "
            "above it in this table, never one below (`make lint` checks it with import-linter; the contracts are "
            "in `pyproject.toml`). The Airflow surface comes last; `operators/`, `triggers/`, `ui/`, `loader`, "
            "`configcheck`, `factory`, `live` and `timetables` keep their import paths (users' DAG files and "
            "Airflow's metadata database name them). Tests mirror the package: `tests/<stage>/test_*.py`."
        )
        table = "## Layout\n\n" + textwrap.fill(intro, 118) + "\n\n" + "\n".join(rows) + "\n\n"
        path = self.root / "CONTRIBUTING.md"
        text = path.read_text()
        m = re.search(r"^## Layout\n.*?(?=^## )", text, flags=re.S | re.M)
        if not m:
            self.warn("CONTRIBUTING.md: no '## Layout' section; the layout table was not written")
            return
        self.write(path, text[: m.start()] + table + text[m.end() :])

    def write(self, path: Path, text: str) -> None:
        if path.read_text() != text:
            path.write_text(text)
            self.changed.add(path)

    def format(self) -> None:
        ruff = self.ruff or (
            str(self.root / ".venv/bin/ruff") if (self.root / ".venv/bin/ruff").exists() else shutil.which("ruff")
        )
        if not ruff:
            self.warn("ruff not found (--ruff PATH): the tree is not formatted; run `make fmt`")
            return
        subprocess.run([ruff, "format", "--quiet", "."], cwd=self.root, check=True)

    # --- run -----------------------------------------------------------------------------------------------
    def run(self) -> int:
        before = self.top_level()
        self.plan_moves()
        print("module moves (old -> new):")
        for old, new in sorted(self.moves.items(), key=lambda kv: kv[1]):
            state = "move" if old in self.moved_now else ("done" if self.new_path(new).exists() else "absent")
            print(f"  {state:6} {PKG}/{old}.py -> {PKG}/{new.replace('.', '/')}.py")
        print("stay at the top level:", ", ".join(sorted(STAY)))
        print("test moves:")
        for stem, folder in sorted(self.tests_now.items(), key=lambda kv: (kv[1], kv[0])):
            print(f"  move   tests/{stem}.py -> tests/{folder}/{stem}.py")
        if self.dry_run:
            print(f"dry run: {len(self.moved_now)} module(s) and {len(self.tests_now)} test file(s) would move")
            return 0
        self.absolutize_relative()
        self.apply_moves()
        self.rewrite_all()
        self.write_import_linter()
        self.write_layout()
        self.format()
        after = self.top_level()
        print(f"top-level entries of {PKG}/: {len(before)} before, {len(after)} after: {', '.join(after)}")
        print(
            f"moved {len(self.moved_now)} module(s) and {len(self.tests_now)} test file(s); rewrote {len(self.changed)} file(s)"
        )
        for w in self.warnings:
            print(f"WARNING: {w}")
        return 0


def _names(aliases) -> str:
    return ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in aliases)


def _replace_statements(text: str, edits: list) -> str:
    """Replace each (ast statement, [new statements]) in ``text``, last first; ast columns are UTF-8 bytes."""
    if not edits:
        return text
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:
        return starts[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode())

    for node, stmts in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        a, b = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
        prefix = text[starts[node.lineno - 1] : a]
        sep = "\n" + prefix if not prefix.strip() else "; "  # a statement after `;` or `:` stays on its line
        text = text[:a] + sep.join(stmts) + text[b:]
    return text


def _string_spans(text: str) -> list[tuple[int, int]] | None:
    """Character spans of the string literals (f-strings included) of Python source; None if it does not tokenize."""
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans, depth, begin = [], 0, 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            at = starts[tok.start[0] - 1] + tok.start[1]
            end = starts[tok.end[0] - 1] + tok.end[1]
            name = tokenize.tok_name[tok.type]
            if name == "FSTRING_START":  # Python >= 3.12 tokenizes f-strings in pieces
                begin = at if depth == 0 else begin
                depth += 1
            elif name == "FSTRING_END":
                depth -= 1
                if depth == 0:
                    spans.append((begin, end))
            elif tok.type == tokenize.STRING and depth == 0:
                spans.append((at, end))
    except (tokenize.TokenError, SyntaxError):
        return None
    return spans


def _sentence(text: str) -> str:
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the mapping, change nothing")
    parser.add_argument(
        "--map", action="append", default=[], metavar="OLD=NEW", help="extra move, e.g. prepared=prepare.prepared"
    )
    parser.add_argument("--ruff", help="ruff executable (default: .venv/bin/ruff, then PATH)")
    parser.add_argument("--allow-dirty", action="store_true", help="run on a work tree with uncommitted changes")
    args = parser.parse_args(argv)
    root = Path.cwd()
    if not (root / PKG / "__init__.py").exists():
        sys.exit(f"run from the repository root (no {PKG}/__init__.py here)")
    moves = dict(MOVES)
    for item in args.map:
        old, sep, new = item.partition("=")
        stage = new.split(".")[0]
        if not sep or "." not in new or stage not in {s for s, kind, _ in STAGES if kind == "package"}:
            sys.exit(f"--map {item!r}: expected OLD=STAGE.NAME with STAGE one of the stage packages")
        moves[old] = new
    if not args.dry_run and not args.allow_dirty:
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        if dirty.strip():
            sys.exit("the work tree has uncommitted changes; commit or stash them first (or --allow-dirty)")
    return Relayout(root, moves, args.dry_run, args.ruff).run()


if __name__ == "__main__":
    sys.exit(main())
