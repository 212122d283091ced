"""The provider's Airflow plugin: the backfill progress page (Airflow 3 UI) and the backfill-only timetable."""
