"""The test suite. The package of the Dagster layer first, before anything imports Dagster:
the process settings it makes must hold before gRPC is imported (ccat_assets/__init__.py)."""

import ccat_assets  # noqa: F401
