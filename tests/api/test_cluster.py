"""Two replicas sharing one Redis (IMPETUS_REDIS_URL), as deploy/ runs them: real Gunicorn servers and a
real redis-server on loopback ports. A Socket.IO client on replica A receives the request events of a
request served by replica B; a rate limit of N is used up by N requests spread over both; killing B
leaves A serving; so does a hung or lost Redis.

redis-server comes from Debian's package (`make setup` installs it when it may); without it this
module skips, saying so."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import socketio

from tests.support import DEFAULT_MODEL, ROOT
from tests.support.http import chat
from tests.support.recorder import Recorder, listen
from tests.support.server import Server, free_port, start_server, stop_server

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)
RATE_LIMIT = 6  # requests per hour per key, across the cluster
EVENTS_KEY, LIMIT_KEY, PROXY_KEY = (
    "events-key-0123456789",
    "limit-key-0123456789",
    "proxy-key-0123456789",
)  # separate rate-limit buckets
SOCKET_KEY = "socket-key-0123456789"  # the Socket.IO clients': each handshake spends a request of its budget

pytestmark = [
    pytest.mark.server,
    pytest.mark.slow,
    pytest.mark.skipif(
        REDIS_SERVER is None,
        reason="redis-server is not installed: `make setup` installs Debian's redis-server with apt-get when it "
        "runs as root or with passwordless sudo and apt-get exists; it could not here (see .venv/.redis-tried).",
    ),
]


@dataclass
class Cluster:
    redis: subprocess.Popen[bytes]
    a: Server
    b: Server


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    assert REDIS_SERVER is not None
    port = free_port()
    log = (tmp / "redis.log").open("wb")
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while True:
        try:
            if redis.Redis.from_url(url, socket_timeout=2).ping():
                return process, url
        except redis.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start:\n{(tmp / 'redis.log').read_text()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    redis_process, url = start_redis(tmp)
    env = {
        "IMPETUS_REDIS_URL": url,
        "IMPETUS_API_KEYS": f"{EVENTS_KEY},{LIMIT_KEY},{PROXY_KEY},{SOCKET_KEY}",
        "IMPETUS_RATE_LIMIT": f"{RATE_LIMIT}/hour",
        "IMPETUS_METRICS_INTERVAL": "0.2",
    }
    servers: list[Server] = []
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:  # both load the default model at once
            futures = [pool.submit(start_server, tmp, **env) for _ in range(2)]
        servers += [f.result() for f in futures if f.exception() is None]
        for future in futures:
            future.result()  # raises the first failure (the finally stops the other)
        print(f"two replicas ready in {time.monotonic() - started:.1f} s")
        yield Cluster(redis_process, servers[0], servers[1])
    finally:
        for server in servers:
            stop_server(server)
        if redis_process.poll() is None:
            os.killpg(redis_process.pid, signal.SIGTERM)
        redis_process.wait(30)


@pytest.fixture
def connect() -> Iterator[Callable[[Server], Recorder]]:
    clients: list[socketio.Client] = []

    def make(server: Server) -> Recorder:
        client, recorder = listen(
            server.url,
            ("metrics", "request_event"),  # the key in the handshake
            headers={"Authorization": f"Bearer {SOCKET_KEY}"},
            auth={"rooms": ["metrics", "requests"]},
        )
        clients.append(client)
        return recorder

    yield make
    for client in clients:
        client.disconnect()


def hello(server: Server) -> dict[str, Any]:
    """A short chat on the events key's budget, answered."""
    r = chat(
        server,
        max_tokens=4,
        messages=[{"role": "user", "content": "Say hello."}],
        headers={"Authorization": f"Bearer {EVENTS_KEY}"},
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def finished(recorder: Recorder) -> list[tuple[float, dict[str, Any]]]:
    return [(at, d) for at, d in recorder.of("request_event") if d["event"] == "finished"]


def own_replica(recorder: Recorder) -> str:
    """The replica a client is connected to: metrics never leave their process."""
    recorder.wait(lambda: len(recorder.of("metrics")) >= 2)
    names = {d["replica"] for _, d in recorder.of("metrics")}
    assert len(names) == 1, names
    return names.pop()


def test_an_event_on_one_replica_reaches_clients_of_both(
    cluster: Cluster, connect: Callable[[Server], Recorder]
) -> None:
    on_a, on_b = connect(cluster.a), connect(cluster.b)
    replica_a, replica_b = own_replica(on_a), own_replica(on_b)
    assert replica_a != replica_b

    answer = hello(cluster.b)
    for recorder in (on_a, on_b):
        recorder.wait(lambda r=recorder: bool(finished(r)), timeout=15)
    time.sleep(0.5)  # a duplicate (the event delivered twice) would land by now
    ((at_a, event_a),) = finished(on_a)
    ((_, event_b),) = finished(on_b)
    assert event_a == event_b  # the same event, once, on both replicas' clients
    assert event_a["replica"] == replica_b and event_a["route"] == "/v1/chat/completions"
    assert event_a["status"] == 200 and event_a["completion_tokens"] == answer["usage"]["completion_tokens"]
    assert {d["replica"] for _, d in on_a.of("metrics")} == {replica_a}  # metrics stay on their replica
    print(f"request_event from replica B to a client of replica A: {(at_a - event_a['timestamp']) * 1e3:.1f} ms")
    for name, server in (("A", cluster.a), ("B", cluster.b)):
        rss = re.search(
            r"^impetus_process_resident_memory_bytes (\S+)$",
            requests.get(f"{server.url}/metrics", timeout=10).text,
            re.M,
        )
        assert rss is not None
        print(f"replica {name} resident memory with the default model: {float(rss.group(1)) / 2**20:.0f} MiB")


def test_a_rate_limit_holds_across_replicas(cluster: Cluster) -> None:
    headers = {"Authorization": f"Bearer {LIMIT_KEY}"}
    replicas = (cluster.a, cluster.b)
    for i in range(RATE_LIMIT):
        r = requests.get(f"{replicas[i % 2].base_url}/models", headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit-requests"] == str(RATE_LIMIT)
        assert r.headers["x-ratelimit-remaining-requests"] == str(RATE_LIMIT - 1 - i), (i, dict(r.headers))
    for server in replicas:  # the N+1th, on either replica
        r = requests.get(f"{server.base_url}/models", headers=headers, timeout=30)
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert f"{RATE_LIMIT} per 1 hour" in error["message"] and int(r.headers["Retry-After"]) > 0
    # Another key's budget is its own.
    r = requests.get(f"{cluster.a.base_url}/models", headers={"Authorization": f"Bearer {EVENTS_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text


NGINX = ROOT / ".venv" / "nginx" / "usr" / "sbin" / "nginx"


@pytest.fixture
def nginx(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    """deploy/nginx.conf in front of the two replicas: only the addresses, the listen port and the
    files nginx writes are changed (Compose's names resolve only inside Compose)."""
    if not NGINX.exists():
        pytest.skip(
            "nginx is not available: `make setup` unpacks Debian's nginx into .venv/nginx "
            "(apt-get download nginx, dpkg-deb -x); it could not here (see .venv/.nginx-tried)"
        )
    version = subprocess.run([str(NGINX), "-v"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0:  # unpacked, not installed: a shared library it needs may be missing
        pytest.skip(f"the nginx in .venv/nginx does not run here: {version.stderr.strip()}")
    port = free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    addresses = [s.url.removeprefix("http://") for s in (cluster.a, cluster.b)]
    conf, upstreams = re.subn(
        r"server impetus:8080( [^;]*)?;",
        lambda m: "\n        ".join(f"server {a}{m.group(1) or ''};" for a in addresses),
        conf,
    )
    assert upstreams == 2, conf
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    # As root, nginx's workers would run as nobody, who cannot enter pytest's private temporary folder.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = conf.replace("pid /tmp/nginx.pid;", f"{user}pid {tmp_path}/nginx.pid;")
    conf = conf.replace(
        "access_log /dev/stdout;",
        f"access_log {tmp_path}/access.log;\n"
        + "".join(
            f"    {kind}_temp_path {tmp_path}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        ),
    )
    (tmp_path / "nginx.conf").write_text(conf)
    command = [str(NGINX), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    log = (tmp_path / "nginx.log").open("wb")
    process = subprocess.Popen(
        [*command, "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{url}/health/live", timeout=2)
            break
        except requests.ConnectionError:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "nginx.log").read_text()
            time.sleep(0.1)
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


def test_through_nginx(cluster: Cluster, nginx: str) -> None:
    """deploy/nginx.conf for real: Socket.IO's polling transport works only if every request of a
    session reaches one replica (ip_hash); SSE arrives as it is generated; a body over the server's
    limit gets the server's 413 envelope, not nginx's page; the API is spread over both replicas."""
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    body = {
        "model": DEFAULT_MODEL,
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": "Count to twenty."}],
    }
    received: list[Any] = []

    def finished_events(n: int) -> None:
        deadline = time.monotonic() + 15
        while len([e for e in received if e["event"] == "finished"]) < n:
            assert time.monotonic() < deadline, received
            time.sleep(0.05)

    client = socketio.Client(reconnection=False)
    client.on("request_event", received.append)
    client.connect(nginx, transports=["polling"], wait_timeout=30, headers=headers, auth={"rooms": ["requests"]})
    try:
        arrivals = []
        with requests.post(f"{nginx}/v1/chat/completions", json=body, headers=headers, stream=True, timeout=120) as r:
            assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    arrivals.append(time.monotonic())
        assert len(arrivals) > 5 and arrivals[-1] - arrivals[0] > 0.05, arrivals  # not one buffered burst
        finished_events(1)  # over long-polling, through nginx
        # least_conn: idle replicas take turns, so the next two cannot both land where the first did.
        for _ in range(2):
            r = requests.post(
                f"{nginx}/v1/chat/completions",
                headers=headers,
                timeout=120,
                json={**body, "stream": False, "max_tokens": 1},
            )
            assert r.status_code == 200, r.text
        finished_events(3)
        assert client.transport() == "polling"
    finally:
        client.disconnect()
    assert len({e["replica"] for e in received}) == 2, received

    # Over the body limit: the error envelope (nginx's, as the server's would be), not a 502 or HTML.
    big = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "x" * (8 << 20)}]}
    r = requests.post(f"{nginx}/v1/chat/completions", json=big, headers=headers, timeout=60)
    assert r.status_code == 413 and r.headers["Content-Type"].startswith("application/json"), r.text[:300]
    assert r.json() == {
        "error": {
            "message": "The request body is larger than 8 MiB.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }
    r = requests.post(f"{nginx}/v1/messages", json=big, headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["type"] == "error" and r.json()["error"]["type"] == "request_too_large"
    # Just under it, the body reaches the server (a context-length 400, from the replica).
    under = {**big, "messages": [{"role": "user", "content": "x" * ((8 << 20) - 4096)}]}
    r = requests.post(f"{nginx}/v1/chat/completions", json=under, headers=headers, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"], r.text[:300]


def test_killing_one_replica_leaves_the_other_serving(cluster: Cluster, connect: Callable[[Server], Recorder]) -> None:
    on_a = connect(cluster.a)
    os.killpg(cluster.b.process.pid, signal.SIGKILL)  # a crash: no drain, no goodbye
    cluster.b.process.wait(30)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{cluster.b.url}/health/live", timeout=5)

    assert requests.get(f"{cluster.a.url}/health/ready", timeout=10).status_code == 200
    answer = hello(cluster.a)
    assert answer["choices"][0]["message"]["content"] is not None
    on_a.wait(lambda: bool(finished(on_a)), timeout=15)  # its own events still flow through Redis
    ((_, event),) = finished(on_a)
    assert event["replica"] == own_replica(on_a)


def test_a_hung_or_lost_redis_leaves_a_replica_serving(cluster: Cluster, connect: Callable[[Server], Recorder]) -> None:
    """Redis hung (stopped: it neither answers nor refuses): requests are served, rate limits fail
    open to in-process counters after a 1 s timeout, and the events wait for Redis instead of
    holding up the engine thread (it would never finish a request if it published to Redis itself).
    Redis gone: the same, and this replica's own clients still get its events."""
    on_a = connect(cluster.a)
    os.kill(cluster.redis.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        for _ in range(2):
            hello(cluster.a)
        hung = time.monotonic() - started
        assert requests.get(f"{cluster.a.url}/health/ready", timeout=10).status_code == 200
    finally:
        os.kill(cluster.redis.pid, signal.SIGCONT)
    on_a.wait(lambda: len(finished(on_a)) >= 2, timeout=30)  # held, then delivered

    cluster.redis.kill()
    cluster.redis.wait(30)
    started = time.monotonic()
    hello(cluster.a)
    gone = time.monotonic() - started
    on_a.wait(lambda: len(finished(on_a)) >= 3, timeout=15)
    print(f"4-token chats on replica A: {hung / 2:.2f} s each with Redis hung, {gone:.2f} s with Redis gone")
