"""``python -m airflow_backfill_provider status <dag_id> [--run-id RUN] [--config spec.yaml] [--json]``.

Prints a backfill run's progress (or a whole backfill's: ``--backfill``, automatic when the latest run is in one) (chunks per state, rows, rate, ETA) and the worst validation days.
Reads Airflow's metadata database (like the ``airflow`` CLI: run it where ``airflow`` works) and the
destination through the spec's connection, read-only. Works on Airflow 3.x and 2.11.
"""

from __future__ import annotations

import argparse
import json
import sys


def _spec_from_config(path: str, dag_id: str):
    from airflow_backfill_provider.core.exceptions import SpecError
    from airflow_backfill_provider.loader import _entries
    from airflow_backfill_provider.core.spec import load_spec
    from pathlib import Path

    p = Path(path)
    files = sorted([*p.glob("*.yaml"), *p.glob("*.yml")]) if p.is_dir() else [p]
    names = []
    for f in files:
        for where, data in _entries(f):
            spec = load_spec(data, where=where)
            names.append(spec.effective_dag_id)
            if spec.effective_dag_id == dag_id:
                return spec
    raise SpecError(f"no spec for DAG {dag_id!r} in {path}; it defines: {', '.join(names) or 'nothing'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_backfill_provider")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="progress, ETA and worst validation days of a backfill run")
    status.add_argument("dag_id")
    status.add_argument("--run-id", help="the DAG run (default: the latest; its whole backfill if it is in one)")
    status.add_argument(
        "--backfill",
        nargs="?",
        const="",
        metavar="ID",
        help="the whole backfill: all its runs' totals (ID: Airflow 3's Backfill id; default: the --run-id's "
        "backfill, else the newest; on 2.11 the DAG's backfill-type runs). Automatic when no --run-id is given "
        "and the latest run belongs to a backfill",
    )
    status.add_argument("--config", help="spec YAML file or folder (default: the spec in the serialized DAG)")
    status.add_argument("--json", action="store_true", help="print the page's JSON instead of text")
    status.add_argument("--worst", type=int, default=10, help="how many validation days to list (default 10)")
    args = parser.parse_args(argv)

    from airflow_backfill_provider.core.exceptions import BackfillError

    try:
        from airflow_backfill_provider.observe.airflow_state import collect_view
        from airflow_backfill_provider.observe.progress import format_text

        spec = _spec_from_config(args.config, args.dag_id) if args.config else None
        whole = True if args.backfill is not None else (False if args.run_id else None)
        progress = collect_view(args.dag_id, args.run_id, backfill_id=args.backfill or None, whole=whole, spec=spec)
    except BackfillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(progress.to_dict(), default=str))
    else:
        print(format_text(progress, worst=args.worst))
    return 1 if progress.counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
