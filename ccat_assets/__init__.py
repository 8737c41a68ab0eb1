"""The Dagster layer: assets, checks, partitions and jobs of the package lifecycle."""
