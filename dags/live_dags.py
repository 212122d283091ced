"""Live-ingest DAGs for the specs in ./configs that set ``live: {enabled: true}`` (e.g. live_orders).

Same YAML as the backfill DAGs: one spec describes both sides. Parse-time cheap: no database access.
"""

from pathlib import Path

from airflow_backfill_provider.live_factory import register_live

register_live(Path(__file__).parent / "configs", globals())
