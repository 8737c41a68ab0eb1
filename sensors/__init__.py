"""Sensors that watch OpsDB and turn new facts into partitions and runs."""
