"""From a DAG run to chunk descriptors: range, watermark clip and pre-flight checks (planning, checks); calendar,
auto-sized and key-range cuts; catalog statistics; resume; batches."""
