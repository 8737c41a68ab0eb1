"""A small client for instrument computers: files through the site's filing service over HTTP,
so the instrument needs neither our database credentials nor a route to OpsDB.

Every write carries a request id chosen once and reused on each retry, so a request whose
answer was lost is applied once; connection errors, 429 and 5xx are retried with exponential
back-off and jitter, any other 4xx is raised at once (retrying bad input cannot help).
"""

from __future__ import annotations

import random
import time
import uuid as uuidlib
from collections.abc import Sequence
from typing import Any

import httpx

from ccat_dt.filing import FileSpec

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class ServiceError(Exception):
    """The service refused a request (4xx) or stayed unreachable through every retry."""

    def __init__(self, message: str, status: int | None = None,
                 errors: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.status, self.errors = status, list(errors)


class FilingClient:
    def __init__(self, url: str, token: str | None, *, attempts: int = 8,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, timeout_s: float = 120.0,
                 batch: int = 5000) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.attempts, self.backoff_s, self.max_backoff_s = attempts, backoff_s, max_backoff_s
        self.batch = batch

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FilingClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- writes --------------------------------------------------------------------------

    def start_observation(self, name: str, uuid: str | None = None) -> dict[str, Any]:
        return self._write("POST", "/executed_obs_units/start", {"name": name, "uuid": uuid})

    def finish_observation(self, name: str) -> dict[str, Any]:
        return self._write("PUT", f"/executed_obs_units/{name}/finish", {})

    def file_one(self, observation: str, module: str, path: str, *, size: int | None = None,
                 checksum: str | None = None, uuid: str | None = None,
                 site: str | None = None, location: str | None = None) -> dict[str, Any]:
        return self._write("POST", "/raw_data_files", {
            "observation": observation, "module": module, "path": path, "size": size,
            "checksum": checksum, "uuid": uuid, "site": site, "location": location})

    def file(self, observation: str, module: str, files: Sequence[FileSpec | str], *,
             site: str | None = None, location: str | None = None) -> list[dict[str, Any]]:
        """File many files, `batch` per request (each request all or nothing)."""
        specs = [f if isinstance(f, FileSpec) else FileSpec(f) for f in files]
        answers = []
        for start in range(0, len(specs), self.batch):
            chunk = specs[start:start + self.batch]
            answers.append(self._write("POST", "/raw_data_files/bulk", {
                "observation": observation, "module": module, "site": site,
                "location": location,
                "files": [{"path": s.path, "size": s.size, "checksum": s.checksum,
                           "uuid": s.uuid} for s in chunk]}))
        return answers

    # --- reads ---------------------------------------------------------------------------

    def observation(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/executed_obs_units/{name}")

    def raw_file(self, uuid: str) -> dict[str, Any]:
        return self._request("GET", f"/raw_data_files/{uuid}")

    def package(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/raw_data_packages/{name}")

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    # --- transport -----------------------------------------------------------------------

    def _write(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in body.items() if v is not None}
        body["request_id"] = str(uuidlib.uuid4())  # the same on every retry of this call
        return self._request(method, path, body)

    def _request(self, method: str, path: str,
                 body: dict[str, Any] | None = None) -> dict[str, Any]:
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * random.uniform(0.5, 1.0))
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRY_STATUS:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            try:
                data = response.json()
            except ValueError:
                data = {"detail": response.text[:500]}
            if response.status_code >= 400:
                raise ServiceError(f"{method} {path}: HTTP {response.status_code}: "
                                   f"{data.get('detail', data)}", response.status_code,
                                   data.get("errors", []))
            return dict(data)
        raise ServiceError(f"{method} {path}: no answer after {self.attempts} attempts; last: "
                           f"{problem}")
