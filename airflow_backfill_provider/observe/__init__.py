"""The progress read model, log lines and failure reasons, OpenLineage facets, the asset event, the metadata reads
behind the page and `status`."""
