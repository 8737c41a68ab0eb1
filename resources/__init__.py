"""Dagster resources and IO managers: thin wrappers around the plain-Python domain in ccat_dt."""
