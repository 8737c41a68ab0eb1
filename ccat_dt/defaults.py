"""The embedded default: one observatory, two archives and a processing area under one root."""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIG_NAME = "ccat-dt.yaml"

EMBEDDED_DEFAULT: dict[str, object] = {
    "opsdb_url": "sqlite:///opsdb.sqlite",
    "observatory": "ccat",
    "sites": [
        {"short_name": "ccat", "name": "CCAT Observatory", "description": "Cerro Chajnantor",
         "locations": [
             {"name": "instruments", "type": "source", "root": "sites/ccat/instruments"},
             {"name": "buffer", "type": "buffer", "root": "sites/ccat/buffer"}]},
        {"short_name": "cologne", "name": "Cologne", "description": "University of Cologne",
         "locations": [
             {"name": "buffer", "type": "buffer", "root": "sites/cologne/buffer"},
             {"name": "lta", "type": "long_term_archive", "root": "sites/cologne/lta"}]},
        {"short_name": "us", "name": "Cornell", "description": "Cornell University",
         "locations": [
             {"name": "buffer", "type": "buffer", "root": "sites/us/buffer"},
             {"name": "lta", "type": "long_term_archive", "root": "sites/us/lta"}]},
        {"short_name": "ramses", "name": "RAMSES", "description": "Cologne HPC cluster",
         "locations": [
             {"name": "processing", "type": "processing", "root": "sites/ramses/processing"}]},
    ],
    "routes": [
        {"origin": "ccat", "destination": "cologne", "transport": "local", "cost": 10},
        {"origin": "ccat", "destination": "us", "transport": "local", "cost": 10},
        {"origin": "cologne", "destination": "us", "transport": "local", "cost": 2},
        {"origin": "us", "destination": "cologne", "transport": "local", "cost": 2},
        {"origin": "cologne", "destination": "ramses", "transport": "local", "cost": 1},
        {"origin": "us", "destination": "ramses", "transport": "local", "cost": 5},
    ],
    "policies": {"package_max_bytes": 50 * 10**9, "required_lta_copies": None, "max_attempts": 3},
    "instruments": [
        {"name": "primecam", "modules": ["f280", "f350"]},
        {"name": "chai", "modules": ["lfa", "hfa"]},
    ],
}


def write_default_config(directory: Path, overrides: dict[str, object] | None = None) -> Path:
    """Write the embedded default configuration into `directory` (refuses to overwrite)."""
    path = directory / CONFIG_NAME
    if path.exists():
        raise FileExistsError(f"{path} already exists; edit it or choose another directory")
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**EMBEDDED_DEFAULT, **(overrides or {})}, sort_keys=False))
    return path
