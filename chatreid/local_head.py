"""The local stack's Ray head as the core joins it: loopback only, token auth.

`chatreid up` (the application layer, ``chatreid.app.stack``) starts that head;
:func:`chatreid.cluster.connect` joins it. What both need lives here, in the core, so that
joining Ray never imports the launcher.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from typing import Any

import psutil
from dotenv import dotenv_values

from chatreid.config import Settings, credentials_file

# The local head and an in-process Ray: Ray resolves 127.0.0.1 to the machine's address and
# binds the GCS, raylet, agents and workers on every interface unless it runs as a single-node
# cluster (its Windows/macOS mode); with it every listener is on 127.0.0.1 and no other node can
# join. Except one: Ray Serve 2.60 binds each replica's inter-deployment gRPC server on [::]
# (hard-coded), so these Rays run with token auth too (the local head's token generated into
# credentials.env, an in-process Ray's made up per process), and that server wants it.
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
RAY_TOKEN_VAR = "CHATREID_RAY__AUTH_TOKEN"


def ray_token_env(token: str) -> dict[str, str]:
    """The environment of a Ray process (and its children) using token auth with ``token``."""
    return {**LOOPBACK_RAY_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or an IPv4-mapped loopback; a wildcard or any other address is not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def stored(settings: Settings, var: str) -> str | None:
    """A value of the stack's credentials file (None when absent)."""
    path = credentials_file(settings.stack.data_dir.resolve())
    if not path.exists():
        return None
    return dotenv_values(path).get(var) or None


class LocalHead:
    """The Ray head of the local stack on ``stack.ray_port`` (127.0.0.1)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = settings.stack.ray_port

    def healthy(self) -> bool:
        return port_open(self.port)

    def exposure(self) -> list[str]:
        """Non-loopback listeners of the head's port (empty: loopback only). A head started by
        an older `chatreid up` listens on every interface with auth off."""
        exposed: list[str] = []
        with contextlib.suppress(psutil.Error):
            for conn in psutil.net_connections(kind="tcp"):
                laddr: Any = conn.laddr  # an addr(ip, port) once listening
                if (conn.status == psutil.CONN_LISTEN and laddr.port == self.port
                        and not is_loopback(laddr.ip)):
                    exposed.append(f"{laddr.ip or '*'}:{self.port}")
        return exposed

    def check_loopback(self) -> None:
        exposed = self.exposure()
        if exposed:
            raise RuntimeError(
                f"the Ray head on port {self.port} listens on {exposed[0]}, beyond loopback "
                "(started by an older `chatreid up`?): anyone who reaches it runs code and "
                "reads its secrets. Stop it (`chatreid down`, or `ray stop`) and run "
                "`chatreid up` again.")

    def token(self) -> str | None:
        """The head's token: configured (``ray.auth_token``), else the generated one."""
        configured = self.settings.ray.auth_token
        if configured is not None and configured.get_secret_value():
            return configured.get_secret_value()
        return stored(self.settings, RAY_TOKEN_VAR)
