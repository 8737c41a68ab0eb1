"""`python -m bench.service`: the filing service's acknowledgement and drain rates.

A real `ccat-dt serve` child on loopback, PostgreSQL (CCAT_TEST_POSTGRES_URL, default the test
database) reached through the tests' TCP relay; prints the rows of docs/benchmarks.md §8.
Files are small (1 KiB): the figures are the per-file overhead of HTTP, validation, hashing and
the journal, not disk throughput. CCAT_BENCH_SERVICE_FILES sets the bulk size (default 5000).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ccat_dt.client import FilingClient
from ccat_dt.config import load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.service.tokens import create_token
from ccat_dt.topology import prepare_opsdb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.faults.link import Link  # noqa: E402
from tests.services import POSTGRES_URL, free_port  # noqa: E402


def main() -> None:
    bulk_n = int(os.environ.get("CCAT_BENCH_SERVICE_FILES", "5000"))
    single_n = 300
    schema = f"ccat_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as db:
        db.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    work = Path(tempfile.mkdtemp(prefix="ccat-bench-service-"))
    process = None
    link = Link(url.port or 5432)
    try:
        config = load_config(write_default_config(work, {
            "opsdb_url": url.render_as_string(hide_password=False),
            "service": {"max_body_bytes": 64 * 2**20}}))
        prepare_opsdb(config)
        token = create_token(OpsDB(config.opsdb_url), config, name="bench", site="ccat",
                             instruments=[])
        source = config.resolve_root("sites/ccat/instruments")
        via = url.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "ccat_assets.cli", "--config", str(config.path), "serve",
             "--port", str(port), "--log-level", "warning"],
            env={**os.environ, "CCAT_DT_OPSDB_URL": via, "PYTHONPATH": str(REPO)})
        base = f"http://127.0.0.1:{port}"
        client = FilingClient(base, token, timeout_s=600)
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {token}"},
                             timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        rows = []
        for state in ("up", "cut"):
            obs = f"bench-{state}"
            client.start_observation(obs)
            if state == "cut":
                link.cut()
            paths = []
            for i in range(bulk_n + single_n):
                rel = f"{obs}/f{i:06d}.dat"
                (source / rel).parent.mkdir(parents=True, exist_ok=True)
                (source / rel).write_bytes(os.urandom(1024))
                paths.append(rel)
            t0 = time.perf_counter()
            answer = client.file(obs, "primecam/f280", paths[:bulk_n])
            bulk_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for path in paths[bulk_n:]:
                single = client.file_one(obs, "primecam/f280", path)
            single_s = time.perf_counter() - t0
            rows.append(f"| bulk, OpsDB link {state} ({answer[0]['status']}) | {bulk_n} | "
                        f"{bulk_s:.2f} s | {bulk_n / bulk_s:,.0f} files/s |")
            rows.append(f"| one by one, OpsDB link {state} ({single['status']}) | {single_n} | "
                        f"{single_s:.2f} s | {single_n / single_s:,.0f} files/s |")
        link.restore()
        t0 = time.perf_counter()
        while client.health()["journal"]["pending"]:
            time.sleep(0.02)
        drain_s = time.perf_counter() - t0
        rows.append(f"| drain after the link returns: 1 bulk + {single_n} single requests | "
                    f"{bulk_n + single_n} | {drain_s:.2f} s | "
                    f"{(bulk_n + single_n) / drain_s:,.0f} files/s "
                    f"({(1 + single_n) / drain_s:,.0f} requests/s) |")
        print("| what | files | time | rate |\n|---|---:|---:|---:|")
        print("\n".join(rows))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=20)
        link.close()
        with admin.begin() as db:
            db.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
