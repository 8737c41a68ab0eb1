"""Domain logic of the CCAT Data Transfer System: plain Python, no Dagster import."""
