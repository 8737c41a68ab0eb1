"""Choosing the transport for a route, and where a copy is as an endpoint."""

from __future__ import annotations

from pathlib import PurePosixPath

from ccat_dt.config import Config, RouteConfig
from ccat_dt.marker import MARKER
from ccat_dt.opsdb.models import DataLocation, StorageType
from ccat_dt.transports.base import Endpoint, SshSettings, Transport
from ccat_dt.transports.bbcp import BbcpOptions, BbcpTransport
from ccat_dt.transports.local import LocalTransport
from ccat_dt.transports.rsync import RsyncTransport


def ssh_settings(config: Config) -> SshSettings:
    ssh = config.settings.ssh
    resolve = config.resolve_root
    return SshSettings(
        port=ssh.port, connect_timeout_s=ssh.connect_timeout_s,
        identity_file=str(resolve(ssh.identity_file)) if ssh.identity_file else None,
        known_hosts_file=str(resolve(ssh.known_hosts_file)) if ssh.known_hosts_file else None,
        control_persist_s=ssh.control_persist_s, control_dir=ssh.control_dir)


def endpoint(location: DataLocation, relative_path: str) -> Endpoint:
    """A file of a location; the transports write there only while its root is marked (an
    object store's marker is looked at before the transfer, ccat_dt/replicas.py)."""
    if location.storage_type == StorageType.S3:
        return Endpoint(PurePosixPath(relative_path), store=location.root)
    root = PurePosixPath(location.root)
    return Endpoint(root / relative_path, location.host, marker=root / MARKER)


def transport_for(config: Config, route: RouteConfig | None, *, remote: bool,
                  store: bool = False) -> Transport:
    """The route's transport; within one site (no route) a local copy, or rsync on the site's
    host when its locations are remote. When an end is an object store (`store`), the S3
    transport, whatever the route says: only it speaks to object stores."""
    if store:
        from ccat_dt.objectstore import Stores
        from ccat_dt.transports.s3 import S3Transport

        return S3Transport(Stores.of(config))
    kind = route.transport if route else ("rsync" if remote else "local")
    if kind == "local":
        return LocalTransport()
    if kind == "rsync":
        return RsyncTransport(ssh_settings(config), config.log_dir,
                              bandwidth_limit_kbps=route.bandwidth_limit_kbps if route else None)
    assert route is not None
    bbcp = route.bbcp
    return BbcpTransport(BbcpOptions(streams=bbcp.streams, window=bbcp.window,
                                     progress_interval_s=bbcp.progress_interval_s,
                                     stall_timeout_s=bbcp.stall_timeout_s or None,
                                     rate_limit=bbcp.rate_limit, port_range=bbcp.port_range,
                                     remote_bbcp=bbcp.remote_bbcp),
                         ssh_settings(config), config.log_dir)
