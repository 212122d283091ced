"""Static checks of the Docker Compose demo (docker-compose.yaml, Dockerfile, compose/).

Docker cannot run on the development machines, so `docker compose up` has never been run here. These
tests check what can be checked without it: the structure of the compose file (services, dependencies,
health checks, environment), that the image installs this repository, that the build context really
contains and builds the package, that the init step creates the pool, and that the seed SQL runs on a
real PostgreSQL.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
import yaml

from tests.seed import create_orders
from airflow_backfill_provider.core.spec import BackfillSpec

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
INIT_SCRIPT = ROOT / "compose" / "airflow-init.sh"
SOURCE_SEED = ROOT / "compose" / "source-db" / "01-orders.sql"
SOURCE_ROLE = ROOT / "compose" / "source-db" / "02-reader-role.sql"
DEST_SEED = ROOT / "compose" / "dest-db" / "01-orders.sql"
ORDERS_CONFIG = ROOT / "dags" / "configs" / "orders.yaml"

DATABASES = {"metadata-db", "source-db", "dest-db"}
LONG_RUNNING_AIRFLOW = {
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}
REQUIRED = DATABASES | {"redis", "airflow-init"} | LONG_RUNNING_AIRFLOW
ONE_SHOT = {"airflow-init", "airflow-cli"}  # run to completion: no health check, no restart
SOURCE_CONN, DEST_CONN = "AIRFLOW_CONN_BACKFILL_SOURCE_PG", "AIRFLOW_CONN_BACKFILL_DEST_PG"


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE.open() as f:
        return yaml.safe_load(f)  # resolves the x-airflow-common anchors and << merges


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def airflow_services(services) -> dict:
    """Every service built on the x-airflow-common anchor (it is the one with a `build`)."""
    return {name: svc for name, svc in services.items() if "build" in svc}


def _default(value: str) -> str:
    """The value compose uses when the variable is unset: ${X:-default} -> default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", str(value))


# --- services ----------------------------------------------------------------------------------------
def test_required_services_present(services):
    missing = REQUIRED - set(services)
    assert not missing, f"docker-compose.yaml lacks services {sorted(missing)}"
    assert set(airflow_services(services)) >= LONG_RUNNING_AIRFLOW | {"airflow-init"}


def test_airflow_commands_follow_airflow_3(services):
    expected = {
        "airflow-apiserver": "api-server",
        "airflow-scheduler": "scheduler",
        "airflow-dag-processor": "dag-processor",
        "airflow-triggerer": "triggerer",
        "airflow-worker": "celery worker",
    }
    for name, command in expected.items():
        assert services[name]["command"] == command, f"{name}: command should be {command!r}"


def test_databases_and_redis_images(services):
    for name in DATABASES:
        assert services[name]["image"].startswith("postgres:"), name
        env = services[name]["environment"]
        assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(env), name
    assert services["redis"]["image"].startswith("redis:")


# --- dependencies and health checks --------------------------------------------------------------------
def test_every_dependency_has_a_condition_and_exists(services):
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must be a mapping with conditions, not a list"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            cond = spec.get("condition")
            assert cond in {"service_healthy", "service_completed_successfully"}, f"{name} -> {dep}: {cond!r}"
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits for {dep} to be healthy but {dep} has no healthcheck"
                )
            else:
                assert dep in ONE_SHOT, f"{name} waits for {dep} to complete but {dep} is long-running"


def test_airflow_services_wait_for_backends_and_init(services):
    for name, svc in airflow_services(services).items():
        deps = svc["depends_on"]
        for backend in ("metadata-db", "redis"):
            assert deps.get(backend, {}).get("condition") == "service_healthy", f"{name} must wait for {backend}"
    for name in LONG_RUNNING_AIRFLOW:
        deps = services[name]["depends_on"]
        assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
    # the worker talks to the execution API, so it waits for the api-server (as in the official file)
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    # chunk tasks need both demo databases
    for db in ("source-db", "dest-db"):
        assert services["airflow-worker"]["depends_on"][db]["condition"] == "service_healthy"


def test_every_long_running_service_has_a_healthcheck(services):
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert "healthcheck" not in svc and "restart" not in svc, f"{name} runs once; no healthcheck/restart"
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, f"{name}: no usable healthcheck"
        assert svc.get("restart") == "always", f"{name}: long-running services restart"


def test_seeded_databases_report_healthy_only_after_the_seed(services):
    # The postgres image seeds with a socket-only temporary server; a TCP check on the seeded table
    # does not pass before the seed has finished.
    source_check = " ".join(services["source-db"]["healthcheck"]["test"])
    assert "-h 127.0.0.1" in source_check and "public.orders" in source_check
    assert "public.orders" in " ".join(services["dest-db"]["healthcheck"]["test"])


# --- environment -------------------------------------------------------------------------------------
def test_celery_executor_with_redis_broker_and_metadata_result_backend(services):
    meta = services["metadata-db"]["environment"]
    for name, svc in airflow_services(services).items():
        env = svc["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
        assert broker.scheme == "redis" and broker.hostname == "redis", f"{name}: broker {broker.geturl()}"
        for key in ("AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
            url = urlsplit(env[key])
            assert url.hostname == "metadata-db", f"{name}: {key} points at {url.hostname}"
            assert (url.username, url.password, url.path.lstrip("/")) == (
                meta["POSTGRES_USER"],
                meta["POSTGRES_PASSWORD"],
                meta["POSTGRES_DB"],
            ), f"{name}: {key} credentials differ from metadata-db's"
        assert urlsplit(env["AIRFLOW__CELERY__RESULT_BACKEND"]).scheme == "db+postgresql"


def test_airflow_3_component_settings(services):
    api_ports = services["airflow-apiserver"]["ports"]
    assert any(_default(p).endswith(":8080") for p in api_ports)
    for name, svc in airflow_services(services).items():
        env = svc["environment"]
        url = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert (url.hostname, url.port, url.path) == ("airflow-apiserver", 8080, "/execution/"), name
        # one JWT secret for all components, or the api-server rejects the workers' task tokens
        assert _default(env["AIRFLOW__API_AUTH__JWT_SECRET"]), name
        assert env["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
        assert env.get("_PIP_ADDITIONAL_REQUIREMENTS", "") == "", f"{name}: the provider comes from the image"
        assert any(v.endswith(":/opt/airflow/dags") for v in svc["volumes"]), f"{name}: ./dags not mounted"


def test_connections_point_at_the_demo_databases(services):
    role_sql = SOURCE_ROLE.read_text()
    for name, svc in airflow_services(services).items():
        env = svc["environment"]
        for var, db in ((SOURCE_CONN, "source-db"), (DEST_CONN, "dest-db")):
            assert var in env, f"{name}: {var} missing"
            url = urlsplit(env[var])
            db_env = services[db]["environment"]
            assert url.scheme in {"postgresql", "postgres"}, f"{var}: scheme {url.scheme!r}"
            assert url.hostname == db and (url.port or 5432) == 5432, f"{var} must point at service {db}"
            assert url.path.lstrip("/") == db_env["POSTGRES_DB"], f"{var}: database differs from {db}'s"
            if db == "dest-db":
                assert (url.username, url.password) == (db_env["POSTGRES_USER"], db_env["POSTGRES_PASSWORD"])
            else:  # a read-only role created by the seed, not the superuser
                assert url.username != db_env["POSTGRES_USER"]
                assert f"CREATE ROLE {url.username} LOGIN PASSWORD '{url.password}'" in role_sql
                assert f"GRANT SELECT ON public.orders TO {url.username}" in role_sql
                assert f"GRANT CONNECT ON DATABASE {db_env['POSTGRES_DB']} TO {url.username}" in role_sql


def test_seed_scripts_are_mounted(services):
    for db, folder in (("source-db", "compose/source-db"), ("dest-db", "compose/dest-db")):
        mounts = services[db]["volumes"]
        assert f"./{folder}:/docker-entrypoint-initdb.d:ro" in mounts, db
        assert (ROOT / folder).is_dir()


# --- image -------------------------------------------------------------------------------------------
def test_airflow_image_is_built_from_the_repository_dockerfile(services):
    images = set()
    for name, svc in airflow_services(services).items():
        build = svc["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (ROOT / context).resolve() == ROOT, f"{name}: build context {context!r} is not the repo root"
        assert (ROOT / context / dockerfile).is_file(), f"{name}: {dockerfile} missing"
        images.add(svc["image"])
    assert len(images) == 1, f"Airflow services must share one image, got {images}"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_copied_repository():
    ins = _dockerfile_instructions()
    assert ins[0][0] == "FROM" and re.fullmatch(r"apache/airflow:3\.3\.\d+-python3\.\d+", ins[0][1]), ins[0]
    copies = [shlex.split(rest) for op, rest in ins if op == "COPY"]
    repo_copies = [c for c in copies if [a for a in c if not a.startswith("--")][0] == "."]
    assert repo_copies, "the Dockerfile must COPY the repository (build context '.')"
    dest = [a for a in repo_copies[0] if not a.startswith("--")][-1]
    runs = [rest for op, rest in ins if op == "RUN" and "pip install" in rest]
    assert runs, "no `pip install` in the Dockerfile"
    args = shlex.split(runs[-1])
    assert dest in args, f"`pip install` does not install the copied repository {dest}"
    assert "-e" not in args and "--editable" not in args, "a non-editable install: the image must not need the source"
    # pinning Airflow stops the provider's requirements from changing the image's Airflow version
    assert "apache-airflow==${AIRFLOW_VERSION}" in args


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore matching: * and ? stay within one path segment, **/ spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(rel: str, patterns: list[str]) -> bool:
    """A path is ignored if the last pattern matching it or one of its parent folders is not a '!' one."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        rx = _pattern_regex(pat.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def _build_context(dest: Path) -> list[str]:
    """Copy what `docker build .` would send (per .dockerignore) into dest; returns the relative paths."""
    patterns = _dockerignore_patterns()
    sent = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.split("/")[0] == ".git" or not path.is_file() or _ignored(rel, patterns):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        sent.append(rel)
    return sent


def test_dockerignore_matcher_follows_docker_rules():
    pats = ["*", "!airflow_backfill_provider", "**/__pycache__"]
    assert _ignored("tests/test_x.py", pats)
    assert not _ignored("airflow_backfill_provider/core/spec.py", pats)
    assert _ignored("airflow_backfill_provider/__pycache__/spec.cpython-311.pyc", pats)
    assert not _ignored("airflow_backfill_provider/sub/mod.py", pats)


def _wheel_builder() -> str | None:
    """An interpreter with setuptools and wheel (the venv's setuptools cannot build wheels alone)."""
    for exe in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        if exe and Path(exe).exists():
            probe = subprocess.run([exe, "-c", "import setuptools, wheel"], capture_output=True)
            if probe.returncode == 0:
                return exe
    return None


def test_build_context_builds_the_provider(tmp_path):
    """What the Dockerfile's `pip install` gets: the .dockerignore'd context must build the provider."""
    ctx = tmp_path / "context"
    ctx.mkdir()
    sent = _build_context(ctx)
    assert "pyproject.toml" in sent and "airflow_backfill_provider/__init__.py" in sent, sent
    assert not any(s.startswith(("tests/", "dags/", "logs/", ".git")) for s in sent), sent
    exe = _wheel_builder()
    if exe is None:
        pytest.skip("no Python with setuptools and wheel on this machine to build the provider wheel")
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [exe, "-c", "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))", str(out)],
        cwd=ctx,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import zipfile

    wheel = next(out.glob("airflow_backfill_provider-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "airflow_backfill_provider/__init__.py" in names
    expected_modules = {p.relative_to(ctx).as_posix() for p in (ctx / "airflow_backfill_provider").rglob("*.py")}
    assert expected_modules <= set(names), sorted(expected_modules - set(names))
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[apache_airflow_provider]" in text and "get_provider_info" in text, text


# --- scaling -----------------------------------------------------------------------------------------
def test_workers_can_be_scaled(services):
    worker = services["airflow-worker"]
    assert "container_name" not in worker, "container_name makes `--scale airflow-worker=N` fail"
    assert "ports" not in worker, "a fixed host port makes `--scale airflow-worker=N` fail"
    assert "hostname" not in worker, "replicas need distinct hostnames (celery@$HOSTNAME)"
    assert worker["environment"].get("DUMB_INIT_SETSID") == "0", "warm shutdown on scale-down"


# --- init step ---------------------------------------------------------------------------------------
def test_init_step_runs_the_init_script(services):
    init = services["airflow-init"]
    assert init["user"] == "0:0" and init["entrypoint"] == "/bin/bash"
    mount = "./compose/airflow-init.sh:/compose/airflow-init.sh:ro"
    assert mount in init["volumes"] and init["command"] == ["/compose/airflow-init.sh"]
    env = init["environment"]
    assert env["_AIRFLOW_DB_MIGRATE"] == "true" and env["_AIRFLOW_WWW_USER_CREATE"] == "true"
    proc = subprocess.run(["bash", "-n", str(INIT_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _script_commands() -> list[str]:
    """The init script's command lines: continuations joined, comments dropped."""
    script = INIT_SCRIPT.read_text().replace("\\\n", " ")
    return [ln for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_init_step_creates_the_source_pool(services):
    pool_lines = [ln for ln in _script_commands() if re.search(r"\bpools set\b", ln)]
    assert len(pool_lines) == 1, "the init script must run `airflow pools set` once"
    args = shlex.split(pool_lines[0])
    name, slots = args[args.index("set") + 1 : args.index("set") + 3]
    env = services["airflow-init"]["environment"]
    name = re.sub(r"\$\{BACKFILL_SOURCE_POOL:-[^}]*\}", env["BACKFILL_SOURCE_POOL"], name)
    slots = re.sub(r"\$\{BACKFILL_SOURCE_POOL_SLOTS:-[^}]*\}", _default(env["BACKFILL_SOURCE_POOL_SLOTS"]), slots)
    # the pool a spec uses unless it names another one
    assert name == BackfillSpec.model_fields["pool"].default == "backfill_source"
    assert int(slots) == 4
    # the calls go through /entrypoint (the official image's user setup), directly or via the af helper
    assert re.search(r"^\s*af pools set", pool_lines[0])
    assert any(re.match(r"\s*af\(\).*/entrypoint airflow", ln) for ln in _script_commands())


def test_pool_flags_exist_in_the_installed_airflow_cli(tmp_path):
    line = next(ln for ln in _script_commands() if re.search(r"\bpools set\b", ln))
    flags = [a for a in shlex.split(line) if a.startswith("--")]
    airflow = Path(sys.executable).with_name("airflow")
    if not airflow.exists():
        pytest.skip(f"no airflow CLI next to {sys.executable}")
    proc = subprocess.run(
        [str(airflow), "pools", "set", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in flags:
        assert flag in proc.stdout, f"`airflow pools set` has no {flag}"


def test_example_config_matches_the_stack(services):
    if not ORDERS_CONFIG.exists():
        pytest.skip(f"{ORDERS_CONFIG.relative_to(ROOT)} not written yet")
    cfg = yaml.safe_load(ORDERS_CONFIG.read_text())
    specs = cfg if isinstance(cfg, list) else cfg.get("backfills", [cfg]) if isinstance(cfg, dict) else []
    env = services["airflow-worker"]["environment"]
    for spec in specs:
        for key in ("source_conn_id", "destination_conn_id"):
            assert f"AIRFLOW_CONN_{spec[key].upper()}" in env, f"{key}={spec[key]!r} has no AIRFLOW_CONN_ variable"
        assert spec.get("pool", "backfill_source") == services["airflow-init"]["environment"]["BACKFILL_SOURCE_POOL"]
        seed = SOURCE_SEED.read_text()
        table = spec["source_table"] if "." in spec["source_table"] else f"public.{spec['source_table']}"
        assert f"CREATE TABLE {table} (" in seed, f"the source seed does not create {table}"
        for col in [*spec["key_columns"], spec["time_column"], spec.get("version_column") or spec["time_column"]]:
            assert re.search(rf"^\s+{re.escape(col)}\s", seed, re.M), f"seeded {table} has no column {col!r}"


# --- seed SQL on a real PostgreSQL -------------------------------------------------------------------
def _run_sql(url: str, path: Path) -> None:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(path.read_text())
    conn.close()


def _columns(url: str) -> list[tuple]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = 'orders' ORDER BY ordinal_position"
        )
        rows = cur.fetchall()
    conn.close()
    return rows


def test_seed_sql_builds_two_years_of_orders(databases, src_url, dst_url):
    _run_sql(src_url, SOURCE_SEED)
    _run_sql(dst_url, DEST_SEED)
    with psycopg2.connect(src_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), min(created_at), max(created_at), count(DISTINCT created_at::date), "
            "bool_and(updated_at >= created_at), count(DISTINCT status), sum(amount) FROM public.orders"
        )
        n, lo, hi, days, versions_ok, statuses, total = cur.fetchone()
        cur.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'orders' AND indexdef LIKE '%(created_at)%'")
        assert cur.fetchone(), "no index on orders.created_at: every chunk would scan the whole table"
    conn.close()
    assert n == 70176 and days == 731, (n, days)  # 2023 + 2024 (leap year), 96 rows a day
    assert (lo.year, hi.year) == (2023, 2024)
    assert versions_ok and statuses == 4 and total > 0
    assert _columns(src_url) == _columns(dst_url), "destination orders must have the source's columns"
    # the same shape as `make demo` and the tests (airflow_backfill_provider/demo.py)
    reference = databases.create("ref")
    conn = psycopg2.connect(reference)
    create_orders(conn)
    conn.close()
    assert _columns(src_url) == _columns(reference), "compose seed differs from demo.ORDERS_DDL"
    # deterministic (no random()): reseeding gives the same rows, so documented numbers reproduce
    again = databases.create("src")
    _run_sql(again, SOURCE_SEED)
    assert _digest(src_url) == _digest(again)


def _digest(url: str) -> str:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT md5(string_agg(o::text, ',' ORDER BY id)) FROM public.orders o")
        value = cur.fetchone()[0]
    conn.close()
    return value
