"""Secure by default (issue 14): every local server listens on loopback only (but for Ray
Serve's replica gRPC server, which Ray binds on [::] itself: it wants the token), every Ray
runs with token auth, and the local stack's secrets are generated, stored owner-only and shown
once. Against real servers: a Ray head started through
``LocalStack`` on ports of its own, the broker and object store the session uses, an in-process
Ray, and a token-protected head."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from chatreid.app.stack import LocalStack
from chatreid.config import Settings
from chatreid.local_head import LOOPBACK_RAY_ENV

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[1]
SECRET_VARS = ("CHATREID_S3__ACCESS_KEY", "CHATREID_S3__SECRET_KEY", "CHATREID_SERVE__API_KEY",
               "CHATREID_STACK__DATA_DIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")


def free_port(lo: int = 20000, hi: int = 29000) -> int:
    """A free loopback port outside Ray's worker range (10002-19999)."""
    while True:
        port = random.randrange(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def loopback(ip: str) -> bool:
    return ip == "::1" or ip.startswith("127.") or ip.startswith("::ffff:127.")


def listeners(pids) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of these processes."""
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for c in proc.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return found


def group(pgid: int) -> list[int]:
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return out


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    return {**env, **extra}


# Run in a subprocess (a Ray driver changes its process for good): connect the way every job
# does, start an actor and a task (and with SERVE=1 a Serve app), then report every listener of
# this driver, its children, the actor's and the replica's processes.
DRIVER = """
import json, os, sys, urllib.request, psutil, ray
from chatreid.config import Settings
from chatreid.cluster import connect
settings = Settings()
settings.ray.join_local_head = os.environ.get("JOIN", "1") == "1"
connect(settings)
@ray.remote
class Probe:
    def pid(self):
        return os.getpid()
actor = Probe.remote()
pids = [ray.get(actor.pid.remote()), os.getpid()]
assert ray.get(ray.remote(lambda: 1).remote()) == 1
if os.environ.get("SERVE_PORT"):
    from ray import serve
    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Hello:
        def __call__(self, request):
            return os.getpid()
    port = int(os.environ["SERVE_PORT"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Hello.bind(), name="probe", route_prefix="/")
    # the app answers over HTTP without Ray's token: that is the data plane
    pids.append(int(urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).read()))
pids += [c.pid for c in psutil.Process().children(recursive=True)]
out = []
for pid in pids:
    try:
        p = psutil.Process(pid)
        out += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
import grpc  # a plain channel: no Ray token attached
for entry in out:  # what a call without the token gets, from a non-loopback listener
    entry.append(None)
    if not entry[1].startswith(("127.", "::ffff:127.")) and entry[1] != "::1":
        with grpc.insecure_channel(f"127.0.0.1:{entry[2]}") as channel:
            try:
                channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=10)
                entry[3] = "OK"
            except grpc.RpcError as exc:
                entry[3] = exc.code().name
print("LISTENERS " + json.dumps(out))
if os.environ.get("SERVE_PORT"):
    serve.shutdown()
"""


def run_driver(env: dict[str, str], timeout: float = 240) -> list[list]:
    done = subprocess.run([sys.executable, "-c", DRIVER], env=env, cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("LISTENERS "))
    return json.loads(line.removeprefix("LISTENERS "))


def refuses_without_token(port: int, method: str) -> bool:
    """A gRPC call without Ray's token is refused as unauthenticated (not merely unknown)."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary(method)(b"", timeout=10)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def assert_loopback_or_authenticated(found: list) -> None:
    """Every listener is on loopback, except Serve replicas' inter-deployment gRPC server,
    which Ray Serve 2.60 binds on [::] itself: that one must refuse calls without the token."""
    for name, ip, port, untokened_call in found:
        if not loopback(ip):
            assert name.startswith("ray::ServeRepli"), (name, ip, port)
            assert untokened_call == "UNAUTHENTICATED", (name, ip, port, untokened_call)


def test_local_ray_head_listens_on_loopback_only(tmp_path: Path) -> None:
    """The head `chatreid up` starts, and everything a job adds to it (driver, workers, actor),
    listens on 127.0.0.1 only: before, the GCS was on *:6379 and the agents, the Ray client
    server and the workers on the machine's address, with auth off."""
    settings = Settings()
    settings.stack.data_dir = tmp_path / "stack"
    settings.ray.auth_token = None  # a fresh stack: not the token of this checkout's own stack
    settings.stack.ray_port, settings.stack.ray_client_port = free_port(), free_port()
    settings.stack.ray_num_cpus = 1
    stack = LocalStack(settings)
    try:
        stack.start_ray()
        pgid = stack.pids()["ray"]
        deadline = time.monotonic() + 60  # the Ray client server comes up last
        while True:
            head = listeners(group(pgid))
            if settings.stack.ray_client_port in {p for _, _, p in head}:
                break
            assert time.monotonic() < deadline, head
            time.sleep(0.5)
        names = {name for name, _, _ in head}
        assert ("gcs_server", settings.stack.ray_port) in {(n, p) for n, _, p in head}, head
        assert settings.stack.ray_client_port in {p for _, _, p in head}, head
        assert {"raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} & names, names
        assert all(loopback(ip) for _, ip, _ in head), [x for x in head if not loopback(x[1])]
        # and it wants its token (generated into the stack's credentials file), even there
        # the internal KV, where `share()` keeps the secrets Serve and Train processes need
        assert refuses_without_token(settings.stack.ray_port,
                                     "/ray.rpc.InternalKVGcsService/InternalKVKeys")
        creds = (settings.stack.data_dir / "credentials.env").read_text()
        assert f"CHATREID_RAY__AUTH_TOKEN={settings.ray.auth_token.get_secret_value()}" in creds

        env = clean_env(CHATREID_STACK__DATA_DIR=str(settings.stack.data_dir),
                        CHATREID_STACK__RAY_PORT=str(settings.stack.ray_port),
                        CHATREID_S3__ACCESS_KEY="unused", CHATREID_S3__SECRET_KEY="unused",
                        SERVE_PORT=str(free_port()))
        driver = run_driver(env)  # a job's driver, an actor and a Serve replica on the head
        names = {n for n, *_ in driver}
        assert "ray::Probe" in names and any(n.startswith("ray::ServeRepli") for n in names)
        assert_loopback_or_authenticated(driver)
        after = listeners(group(pgid))
        assert all(loopback(ip) for _, ip, _ in after), [x for x in after if not loopback(x[1])]
        assert stack.exposed() == []
    finally:
        stopped = stack.down()
        shutil.rmtree(stack.ray_temp, ignore_errors=True)
    assert "ray" in stopped and group(pgid) == []  # its own processes only, no `ray stop`


def test_in_process_ray_listens_on_loopback_only() -> None:
    """The in-process Ray (no cluster configured, no local head) is loopback-only too, with a
    token of its own: before, it ran with auth off and exposed its GCS and workers on every
    interface."""
    driver = run_driver(clean_env(JOIN="0", CHATREID_S3__ACCESS_KEY="unused",
                                  CHATREID_S3__SECRET_KEY="unused", SERVE_PORT=str(free_port())))
    assert any(name == "gcs_server" for name, *_ in driver), driver
    assert_loopback_or_authenticated(driver)


def test_broker_and_object_store_listen_on_loopback_only(stack_base: Settings) -> None:
    conns = psutil.net_connections(kind="tcp")
    owners = {c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.pid
              and c.laddr.port in (stack_base.stack.kafka_port, stack_base.stack.s3_port)}
    assert len(owners) == 2, owners  # Tansu and SeaweedFS
    found = listeners(owners)
    assert len(found) >= 3  # SeaweedFS alone opens master, volume, filer, S3 (+ gRPC)
    assert all(loopback(ip) for _, ip, _ in found), [x for x in found if not loopback(x[1])]


def test_a_configured_cluster_keeps_ray_token_auth(tmp_path: Path) -> None:
    """A cluster beyond the local stack is joined with the token from the environment: before,
    connect() forced RAY_AUTH_MODE=disabled for every cluster, so a token-protected one could
    not be joined at all (and an unprotected one was the default everywhere)."""
    import secrets

    port, client = free_port(), free_port()
    temp = f"/tmp/chatreid-ray-t{port}"  # short: Ray's socket paths must fit in 107 bytes
    token = secrets.token_hex(32)
    ray = str(Path(sys.executable).parent / "ray")
    head_env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                         RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen(
        [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--ray-client-server-port={client}", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        env=head_env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=180) == 0
        driver = run_driver(clean_env(CHATREID_RAY__ADDRESS=f"127.0.0.1:{port}",
                                      RAY_AUTH_TOKEN=token, CHATREID_S3__ACCESS_KEY="unused",
                                      CHATREID_S3__SECRET_KEY="unused"))
        assert driver  # joined, and ran an actor and a task
    finally:
        LocalStack._stop_group(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


# -- generated secrets ---------------------------------------------------------------------------
def cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatreid", *args], cwd=cwd, env=env,
                          text=True, capture_output=True, timeout=180)


def stop_private_stack(data_dir: Path, env: dict[str, str]) -> None:
    """Stop the broker `up` started there (the shared object store is not in its pids) and
    drop the bucket it created."""
    from chatreid.storage import ObjectStore

    s = Settings()
    s.stack.data_dir = data_dir
    LocalStack(s).down()
    s.s3.access_key = env["CHATREID_S3__ACCESS_KEY"]
    s.s3.secret_key = env["CHATREID_S3__SECRET_KEY"]
    s.s3.bucket = env["CHATREID_S3__BUCKET"]
    ObjectStore(s.s3).drop_bucket()


def test_up_shows_the_bootstrap_key_once_and_stores_it_owner_only(
        stack_base: Settings, tmp_path: Path) -> None:
    """`chatreid up` in a fresh checkout: the bootstrap key is generated into
    .chatreid/credentials.env (0600, directory 0700), printed the first time only, read back
    by every later command, and written to no log."""
    kafka = free_port()
    env = clean_env(
        COLUMNS="200",
        CHATREID_STACK__KAFKA_PORT=str(kafka),
        CHATREID_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{kafka}",
        # the session's object store already runs with these keys: configured, so kept
        CHATREID_S3__ACCESS_KEY=stack_base.s3.access_key.get_secret_value(),
        CHATREID_S3__SECRET_KEY=stack_base.s3.secret_key.get_secret_value(),
        CHATREID_S3__ENDPOINT=stack_base.s3.endpoint,
        CHATREID_STACK__S3_PORT=str(stack_base.stack.s3_port),
        CHATREID_S3__BUCKET="t" + os.urandom(5).hex())
    stack_dir = tmp_path / ".chatreid"
    try:
        first = cli(["up", "--no-ray"], tmp_path, env)
        assert first.returncode == 0, first.stdout + first.stderr
        creds = stack_dir / "credentials.env"
        lines = dict(line.split("=", 1) for line in creds.read_text().splitlines()
                     if line and not line.startswith("#"))
        assert set(lines) == {"CHATREID_SERVE__API_KEY"}  # S3 keys configured: not generated
        key = lines["CHATREID_SERVE__API_KEY"]
        assert len(key) >= 40 and key in first.stdout
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert stat.S_IMODE(stack_dir.stat().st_mode) == 0o700

        second = cli(["up", "--no-ray"], tmp_path, env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert key not in second.stdout + second.stderr
        assert "credentials.env" in second.stdout
        assert creds.read_text().count("CHATREID_SERVE__API_KEY") == 1

        # every later command in this checkout reads it (Settings: env, .env, credentials.env)
        read = subprocess.run(
            [sys.executable, "-c", "from chatreid.config import Settings; "
             "print(Settings().serve.api_key.get_secret_value())"], cwd=tmp_path, env=env,
            text=True, capture_output=True, check=True)
        assert read.stdout.strip() == key
        for log in (stack_dir / "logs").iterdir():
            text = log.read_text(errors="replace")
            assert key not in text and stack_base.s3.secret_key.get_secret_value() not in text, log
    finally:
        stop_private_stack(stack_dir, env)


def test_serve_without_a_bootstrap_key_refuses_and_says_how_to_get_one(tmp_path: Path) -> None:
    done = cli(["serve"], tmp_path, clean_env(COLUMNS="200"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "chatreid up" in done.stdout and "--insecure" in done.stdout


def test_up_insecure_generates_no_key_and_warns(stack_base: Settings, tmp_path: Path) -> None:
    kafka = free_port()
    env = clean_env(COLUMNS="200", CHATREID_STACK__KAFKA_PORT=str(kafka),
                    CHATREID_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{kafka}",
                    CHATREID_S3__ACCESS_KEY=stack_base.s3.access_key.get_secret_value(),
                    CHATREID_S3__SECRET_KEY=stack_base.s3.secret_key.get_secret_value(),
                    CHATREID_S3__BUCKET="t" + os.urandom(5).hex())
    try:
        done = cli(["up", "--no-ray", "--insecure"], tmp_path, env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ACCESS CONTROL IS OFF" in done.stdout
        creds = tmp_path / ".chatreid" / "credentials.env"
        assert not creds.exists() or "API_KEY" not in creds.read_text()
    finally:
        stop_private_stack(tmp_path / ".chatreid", env)


def test_an_older_head_on_every_interface_is_refused_not_reused(tmp_path: Path) -> None:
    """A head an older `chatreid up` left running (no --node-ip-address) is not joined or
    reused: `up` and connect() say to restart it, and `status` reports it."""
    import secrets


    settings = Settings()
    settings.stack.data_dir = tmp_path / "stack"
    settings.stack.ray_port, settings.stack.ray_client_port = free_port(), free_port()
    temp = f"/tmp/chatreid-ray-t{settings.stack.ray_port}"
    ray = str(Path(sys.executable).parent / "ray")
    # the old command line (token auth on here, so the test itself exposes nothing usable),
    # without the loopback switch an earlier connect() in this process may have exported
    old_env = {k: v for k, v in clean_env(RAY_AUTH_MODE="token",
                                          RAY_AUTH_TOKEN=secrets.token_hex(32)).items()
               if k not in LOOPBACK_RAY_ENV}
    proc = subprocess.Popen(
        [ray, "start", "--head", f"--port={settings.stack.ray_port}",
         f"--ray-client-server-port={settings.stack.ray_client_port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        env=old_env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=180) == 0
        stack = LocalStack(settings)
        assert stack.ray_exposure()  # e.g. ['*:port']
        with pytest.raises(RuntimeError, match="beyond loopback"):
            stack.start_ray()
        # a job joining it (its own process: this one may have joined a Ray already)
        join = subprocess.run(
            [sys.executable, "-c", "from chatreid.cluster import connect\n"
             "from chatreid.config import Settings\nconnect(Settings())"],
            env={**clean_env(), "CHATREID_STACK__DATA_DIR": str(settings.stack.data_dir),
                 "CHATREID_STACK__RAY_PORT": str(settings.stack.ray_port)},
            capture_output=True, text=True, timeout=120)
        assert join.returncode != 0 and "beyond loopback" in join.stderr, join.stderr[-2000:]
    finally:
        LocalStack._stop_group(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


def test_up_names_the_cause_when_the_object_store_runs_with_other_keys(
        stack_base: Settings, tmp_path: Path) -> None:
    """The object store is reused when it already runs; if it was started with other keys (an
    older `chatreid up` used the well-known ones), up says so instead of an S3 error."""
    settings = stack_base.model_copy(deep=True)
    settings.stack.data_dir = tmp_path / "stack"
    settings.s3.access_key, settings.s3.secret_key = "not-its-key", "not-its-secret-key"
    with pytest.raises(RuntimeError, match=r"refuses the configured keys.*chatreid down"):
        LocalStack(settings).up(ray=False)
