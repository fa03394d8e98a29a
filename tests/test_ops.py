"""Seeing the cluster (minikv/ops): /metrics counts exactly what was served, summed over the
workers; /readyz, the page and `minikv status` say when a volume is down and why, and when it
is back; volumes report their disks; -v writes access lines. Real nginx volumes, real index
processes, and the page loaded in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from cluster import HOST, Cluster, free_port, open_dir, wait_port
from prometheus_client.parser import text_string_to_metric_families

RESULTS = Path(__file__).resolve().parent.parent / "test-results"


def ops_cluster(make_cluster, flags=(), **kw):
    port = free_port()
    c = make_cluster(flags=["-metrics-port", str(port), *flags], **kw)
    wait_port(port)
    c.ops = f"http://{HOST}:{port}"
    c.ops_address = f"{HOST}:{port}"
    return c


def samples(c) -> dict:
    """{(name, ((label, value), ...)): value} of the cluster's /metrics, by prometheus_client's parser."""
    r = requests.get(c.ops + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def requests_total(m: dict) -> dict:
    return {(dict(labels)["method"], dict(labels)["status"]): v
            for (name, labels), v in m.items() if name == "minikv_requests_total"}


def wait_for(check, timeout: float = 10.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, f"not within {timeout}s: {what}"
            return result
        time.sleep(0.1)


def status_cmd(server: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minikv", "status", "-server", server],
                          capture_output=True, text=True, timeout=30)


def test_metrics_count_every_request_of_both_workers(make_cluster):
    c = ops_cluster(make_cluster, workers=2)
    body = b"v" * 100
    expected: dict[tuple[str, str], int] = {}

    def send(method: str, key: str, status: int, **kw) -> None:
        # a new connection each time: the kernel spreads them over both workers' sockets
        r = requests.request(method, c.url(key), allow_redirects=False, timeout=10, **kw)
        assert r.status_code == status, (method, key, r.text)
        expected[(method, str(status))] = expected.get((method, str(status)), 0) + 1

    for i in range(30):
        send("PUT", f"/m{i}", 201, data=body)
    for i in range(30):
        send("GET", f"/m{i}", 302)
    for i in range(10):
        send("GET", f"/missing{i}", 404)
    for i in range(5):
        send("PUT", f"/m{i}", 403, data=body)
    for i in range(5):
        send("DELETE", f"/m{i}", 204)
    for i in range(5, 8):
        send("HEAD", f"/m{i}", 302)

    wait_for(lambda: requests_total(samples(c)) == expected, what=f"request counts {expected}")
    time.sleep(0.6)  # past two more publications: nothing counted twice
    m = samples(c)
    assert requests_total(m) == expected
    for method in {m_ for m_, _ in expected}:
        answered = sum(n for (m_, _), n in expected.items() if m_ == method)
        assert m[("minikv_request_duration_seconds_count", (("method", method),))] == answered
        assert m[("minikv_request_duration_seconds_bucket", (("le", "+Inf"), ("method", method)))] == answered
    assert m[("minikv_received_bytes_total", ())] >= 35 * len(body)
    assert m[("minikv_sent_bytes_total", ())] > 0
    assert m[("minikv_conflicts_total", ())] == 0
    assert m[("minikv_workers", ())] == 2
    assert m[("minikv_index_keys", ())] == 25
    assert m[("minikv_index_pending_records", ())] == 0
    assert m[("minikv_writes_in_flight", (("method", "PUT"),))] == 0
    for name in c.names:  # every PUT and DELETE went to all three
        assert m[("minikv_volume_requests_total", (("volume", name),))] >= 40
        assert m[("minikv_volume_up", (("volume", name),))] == 1
    assert m[("minikv_process_open_fds", ())] > 0
    # both workers served (and were counted): the sum is not one worker's view
    workers = requests.get(c.ops + "/status.json", timeout=10).json()["workers"]
    assert len(workers) == 2 and all(n > 0 for n in workers.values()), workers
    assert sum(workers.values()) == sum(expected.values())


def test_a_dead_workers_counts_stay_in_the_totals(make_cluster):
    c = ops_cluster(make_cluster, workers=2)
    for i in range(20):
        assert requests.put(c.url(f"/w{i}"), data=b"x", timeout=10).status_code == 201
    wait_for(lambda: requests_total(samples(c)) == {("PUT", "201"): 20}, what="20 PUTs counted")

    def workers() -> dict:
        return requests.get(c.ops + "/status.json", timeout=10).json()["workers"]

    victim = max(workers(), key=lambda pid: workers()[pid])
    os.kill(int(victim), signal.SIGKILL)  # a worker of the server this test started
    wait_for(lambda: len(w := workers()) == 2 and victim not in w, what="a new worker replaces the dead one")
    assert requests_total(samples(c)) == {("PUT", "201"): 20}  # counters never go back
    for i in range(10):
        assert requests.get(c.url(f"/w{i}"), allow_redirects=False, timeout=10).status_code == 302
    wait_for(lambda: requests_total(samples(c)) == {("PUT", "201"): 20, ("GET", "302"): 10}, what="new counts")
    assert samples(c)[("minikv_workers", ())] == 2


def test_a_stopped_volume_is_down_with_its_reason_everywhere_until_it_returns(make_cluster):
    c = ops_cluster(make_cluster, workers=2)
    assert requests.get(c.ops + "/readyz", timeout=10).status_code == 200
    assert requests.get(c.ops + "/healthz", timeout=10).text == "ok\n"
    wait_for(lambda: status_cmd(c.ops_address).returncode == 0, what="minikv status exits 0")
    gone = c.names[0]
    c.volumes[0].stop()

    # the first reason may be the probe that the closing connections set off ("closed the
    # connection"); the next round's probe is refused
    why = wait_for(lambda: (r := requests.get(c.ops + "/readyz", timeout=10)).status_code == 503
                   and "Connection refused" in r.text and r.text, what="readyz 503, the volume refusing")
    assert gone in why and "2 of 3 volumes are up" in why and "Connection refused" in why, why
    def down_reasons(m) -> list[str]:
        return [dict(labels)["reason"] for (name, labels), v in m.items()
                if name == "minikv_volume_down_info" and dict(labels)["volume"] == gone and v == 1]

    # each worker keeps its own reason: the one /metrics shows may still be the first probe's
    def refused_in_metrics():
        m = samples(c)
        return m if any("Connection refused" in r for r in down_reasons(m)) else None

    m = wait_for(refused_in_metrics, what="/metrics gives the refusing probe's reason")
    assert m[("minikv_volume_up", (("volume", gone),))] == 0
    reasons = down_reasons(m)
    assert len(reasons) == 1 and "Connection refused" in reasons[0], reasons
    wait_for(lambda: samples(c)[("minikv_volume_errors_total", (("volume", gone),))] > 0, what="errors counted")
    assert m[("minikv_ready", ())] == 0
    # the page and `minikv status` are answered by whichever worker: wait for the refusing reason too
    def refused_on_page():
        text = requests.get(c.ops + "/", timeout=10).text
        return text if f'data-volume="{gone}" data-state="down"' in text and "Connection refused" in text else None

    page = wait_for(refused_on_page, what="the page gives the volume down, refusing")
    assert f'data-volume="{c.names[1]}" data-state="up"' in page

    def refused_in_status():
        out = status_cmd(c.ops_address)
        row = next((line for line in out.stdout.splitlines() if line.startswith(gone)), "")
        return out if "DOWN" in row and "Connection refused" in row else None

    out = wait_for(refused_in_status, what="minikv status gives the volume down, refusing")
    assert out.returncode == 1, out
    # the leading worker logs what its own probes saw: the worker that answered the checks above
    # may be the other one, so the volume stays down until the leader has seen it too
    wait_for(lambda: f"volume {gone} is down" in c.index.log.read_text(), what="the leader logs the volume down")

    c.volumes[0].start()
    wait_for(lambda: requests.get(c.ops + "/readyz", timeout=10).status_code == 200, what="readyz 200 again")
    wait_for(lambda: samples(c)[("minikv_volume_up", (("volume", gone),))] == 1, what="volume up in /metrics")
    wait_for(lambda: status_cmd(c.ops_address).returncode == 0, what="minikv status exits 0 again")
    time.sleep(1.5)  # a few more leader rounds: the change is logged once, not once a round
    log = c.index.log.read_text()
    assert log.count(f"volume {gone} is down") == 1, log
    assert log.count(f"volume {gone} is up again") == 1, log


def test_without_flags_a_volume_going_down_and_up_is_logged_once(make_cluster):
    c = make_cluster(workers=2)
    gone = c.names[1]
    c.volumes[1].stop()
    wait_for(lambda: f"volume {gone} is down" in c.index.log.read_text(), what="the down line")
    c.volumes[1].start()
    wait_for(lambda: f"volume {gone} is up again" in c.index.log.read_text(), what="the up line")
    time.sleep(1.5)
    log = c.index.log.read_text()
    line = next(x for x in log.splitlines() if f"volume {gone} is down" in x)
    assert re.search("Connection (refused|reset)", line), line  # with the reason (reset: nginx caught closing)
    assert log.count(f"volume {gone} is down") == 1 and log.count(f"volume {gone} is up again") == 1, log
    assert "operations listener" not in log


def test_a_killed_servers_folder_is_swept_at_the_next_start(make_cluster):
    from minikv.ops.publish import read_json, write_json

    base = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else tempfile.gettempdir()
    dead = tempfile.mkdtemp(prefix="minikv-ops-", dir=base)
    write_json(dead, "server.json", {"pid": 10**7})  # no such process
    c = ops_cluster(make_cluster, workers=2)
    assert not os.path.exists(dead)

    def folder_of(pid: int) -> str | None:
        for name in os.listdir(base):
            info = read_json(os.path.join(base, name), "server.json") if name.startswith("minikv-ops-") else None
            if info and info.get("pid") == pid:
                return os.path.join(base, name)
        return None

    mine = folder_of(requests.get(c.ops + "/status.json", timeout=10).json()["server"]["pid"])
    assert mine is not None
    c.index.stop(signal.SIGKILL)  # the supervisor (its workers follow): no cleanup runs
    assert os.path.exists(mine)
    c.restart_index(workers=2, flags=["-metrics-port", c.ops_address.rsplit(":", 1)[1]])
    assert not os.path.exists(mine)


SECRET = "ops-test-secret-4242"


def test_volumes_report_their_disk_as_statvfs_sees_it(make_cluster):
    # with a secret and signed redirects (volumes refuse unsigned reads): the index still reads
    # the disk files, and the secret shows nowhere
    secret = ["-secret", SECRET, "-signed", "1h"]
    c = ops_cluster(make_cluster, workers=2, flags=secret, volume_flags=secret)

    def disks():
        vs = requests.get(c.ops + "/status.json", timeout=10).json()["volumes"]
        return vs if all(v["disk"] for v in vs) else None

    volumes = wait_for(disks, what="disk figures")
    m = samples(c)
    slack = 256 << 20  # other programs write to the same disk meanwhile
    for v, proc in zip(volumes, c.volumes):
        folder = proc.args[-1]
        st = os.statvfs(folder)
        assert v["disk"]["size"] == st.f_blocks * st.f_frsize
        assert abs(v["disk"]["used"] - (st.f_blocks - st.f_bfree) * st.f_frsize) < slack
        assert abs(v["disk"]["free"] - st.f_bavail * st.f_frsize) < slack
        assert abs(m[("minikv_volume_disk_free_bytes", (("volume", v["host"]),))] - st.f_bavail * st.f_frsize) < slack
        assert m[("minikv_volume_disk_size_bytes", (("volume", v["host"]),))] == st.f_blocks * st.f_frsize
        assert v["latency"] is not None and v["latency"] < 1.0
        # the file nginx serves keeps its size: overwritten in place, so a full disk still updates it
        assert os.path.getsize(os.path.join(folder, ".minikv-disk.json")) == 512
    for path in ("/", "/status.json", "/metrics"):
        assert SECRET not in requests.get(c.ops + path, timeout=10).text


def test_a_metrics_port_that_cannot_be_had_stops_the_server_with_the_reason():
    import socket

    root = open_dir()
    with socket.socket() as held:
        held.bind((HOST, 0))
        held.listen()
        taken = held.getsockname()[1]
        port = free_port()
        base = [sys.executable, "-m", "minikv", "server", "-host", HOST, "-port", str(port), "-volumes",
                "127.0.0.1:1", "-replicas", "1", "-db", str(root / "index")]
        out = subprocess.run([*base, "-metrics-port", str(taken)], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and f"cannot listen on {HOST}:{taken}" in out.stderr, out
        out = subprocess.run([*base, "-metrics-port", str(port)], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and "-metrics-port must differ from -port" in out.stderr, out
    shutil.rmtree(root, ignore_errors=True)


def test_v_writes_access_lines_as_text_or_json_and_one_worker_serves_metrics_too(make_cluster):
    c = ops_cluster(make_cluster, workers=1, flags=["-v", "-log-json"])
    assert c.put("/logged key", b"hello").status_code == 201
    assert c.get("/logged key", allow_redirects=False).status_code == 302

    def lines():
        found = []
        for line in c.index.log.read_text().splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
        return found if len(found) >= 2 else None

    put, get = wait_for(lines, what="two JSON access lines")[:2]
    assert put["method"] == "PUT" and put["key"] == "/logged key" and put["status"] == 201
    assert get["method"] == "GET" and get["status"] == 302 and get["client"] == HOST
    assert get["bytes"] > 0 and 0 <= get["duration"] < 5
    wait_for(lambda: requests_total(samples(c)) == {("PUT", "201"): 1, ("GET", "302"): 1},
             what="counts with one worker")

    c2 = make_cluster(workers=2, flags=["-v"])
    assert c2.get("/nothing", allow_redirects=False).status_code == 404
    # a signature in a URL is a credential: it never reaches the log
    assert c2.get("/signed?md5=topsecret&expires=1", allow_redirects=False).status_code == 404
    line = wait_for(lambda: next((x for x in c2.index.log.read_text().splitlines() if '"GET /nothing' in x), None),
                    what="a text access line")
    # common log format, then the duration in seconds
    assert line.startswith(f"{HOST} - - [") and '] "GET /nothing HTTP/1.1" 404 ' in line, line
    assert float(line.rsplit(" ", 1)[1]) < 5
    wait_for(lambda: '"GET /signed?md5=REDACTED&expires=1 HTTP/1.1" 404' in c2.index.log.read_text(),
             what="the signed GET's line")
    assert "topsecret" not in c2.index.log.read_text()


def test_operations_port_refuses_what_it_does_not_serve_and_keeps_serving(make_cluster):
    import socket

    c = ops_cluster(make_cluster, workers=1)
    port = int(c.ops_address.rsplit(":", 1)[1])

    def raw(data: bytes) -> bytes:
        with socket.create_connection((HOST, port), timeout=10) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    assert raw(b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    assert raw(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw(b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert raw(b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    # the main port reserves nothing: /metrics there is a key like any other
    assert c.get("/metrics", allow_redirects=False).status_code == 404
    assert c.put("/metrics", b"mine").status_code == 201
    assert status_cmd(f"{HOST}:{c.port}").returncode == 2  # no listener at the main port nor +100


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                       capture_output=True, timeout=900, env=env)
        found = shutil.which("chromium")
    return found


def test_status_page_in_a_real_browser_shows_a_stopped_volume_down(make_cluster):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed and cannot be (apt-get install chromium)")
    c = ops_cluster(make_cluster, workers=2)
    for i in range(10):
        assert c.put(f"/page{i}", b"x" * 1000).status_code == 201
    gone = c.names[2]
    c.volumes[2].stop()
    wait_for(lambda: requests.get(c.ops + "/readyz", timeout=10).status_code == 503, what="volume seen down")
    profile = tempfile.mkdtemp(prefix="minikv-chromium-")
    RESULTS.mkdir(exist_ok=True)
    shot = RESULTS / "ops-status-page.png"
    shot.unlink(missing_ok=True)
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--hide-scrollbars"]
    try:
        dom = subprocess.run([*base, "--dump-dom", c.ops + "/"], capture_output=True, text=True, timeout=120)
        subprocess.run([*base, f"--screenshot={shot}", "--window-size=412,1400", c.ops + "/"],
                       capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    html = dom.stdout
    assert "<table id=\"volumes\">" in html, dom.stderr[-2000:]
    for name in c.names:
        assert f'data-volume="{name}"' in html
    assert f'data-volume="{gone}" data-state="down"' in html and "DOWN" in html
    # why, as the health check saw it: refused, or reset when it caught nginx closing its
    # connections (both seen, depending on when the check ran)
    assert re.search(rf'class="why">volume {re.escape(gone)} is down \(health check: [^<]*Connection (refused|reset)',
                     html), html[-3000:]
    assert "Not ready" in html
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "no screenshot"
    print(f"\nstatus page screenshot: {shot}")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root (mount a tmpfs)")
def test_readyz_says_when_the_index_cannot_write_and_recovers():
    root = open_dir()
    db = root / "index"
    db.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(db)], check=True)
    port = free_port()
    c = Cluster(root, flags=["-metrics-port", str(port)])
    ops = f"http://{HOST}:{port}"
    try:
        c.start()
        wait_port(port)
        assert requests.get(ops + "/readyz", timeout=10).status_code == 200
        ballast = db / "ballast"
        with open(ballast, "wb") as f:  # all but the last 64 KB of the tmpfs
            f.write(b"\0" * (shutil.disk_usage(db).free - (64 << 10)))
        ready = None
        for i in range(5000):  # until the write check fails too (small commits fit in freed pages a while)
            c.put(f"/fill/{i:05d}" + "k" * 100, b"x")
            if i % 20 == 0 and (ready := requests.get(ops + "/readyz", timeout=10)).status_code == 503:
                break
        assert ready is not None and ready.status_code == 503, "readyz never saw the full disk"
        assert "index database" in ready.text and "full" in ready.text, ready.text
        out = status_cmd(f"{HOST}:{port}")
        assert out.returncode == 1 and "NOT WRITABLE" in out.stdout, out
        ballast.unlink()
        wait_for(lambda: requests.get(ops + "/readyz", timeout=10).status_code == 200, what="readyz 200 with space")
    finally:
        c.stop()
        subprocess.run(["umount", "-l", str(db)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_up_starts_the_operations_listener_on_port_plus_100():
    from test_up import free_base

    root = open_dir()
    base = free_base()
    up = subprocess.Popen([sys.executable, "-m", "minikv", "up", "-data", str(root / "data"), "-port", str(base)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(base + 100, up, timeout=20)
        wait_port(base, up, timeout=20)
        assert requests.get(f"http://{HOST}:{base + 100}/healthz", timeout=10).text == "ok\n"
        wait_for(lambda: status_cmd(f"{HOST}:{base}").returncode == 0, what="minikv status via the main port")
    finally:
        up.send_signal(signal.SIGINT)
        out = up.communicate(timeout=30)[0].decode()
        shutil.rmtree(root, ignore_errors=True)
    assert f"status page http://localhost:{base + 100}/" in out, out


# -- pure parts --


def test_history_steps_add_up_across_workers_and_a_histogram_renders_cumulative(tmp_path):
    from minikv.ops.counters import HISTORY_STEP, Counters
    from minikv.ops.metrics import render
    from minikv.ops.publish import gather, rates, write_json
    from minikv.private import redact_target as redact

    t0 = 1_000_000 * HISTORY_STEP  # a step boundary
    workers = [Counters(), Counters()]
    for i, c in enumerate(workers):
        c.sample(t0 + 1)
        for _ in range(10 * (i + 1)):
            c.done(b"GET", b"302", 0.00005)
        c.done(b"PUT", b"503", 0.2)
        c.sample(t0 + HISTORY_STEP + 1)  # closes the first step
        snap = c.snapshot()
        snap.update(pid=10**7 + i, time=0, rx=0, tx=0, volume_requests={}, volume_errors={})
        write_json(str(tmp_path), f"{10**7 + i}.json", snap)
    total = gather(str(tmp_path))
    assert rates(total["history"]) == [(t0, 32 / HISTORY_STEP, 0.0, 2 / HISTORY_STEP)]
    assert total["workers"] == {}  # no such processes: their counts stay, their gauges do not
    assert total["answers"][("GET", "302")][0] == 30 and total["answers"][("PUT", "503")][10] == 2

    from minikv.ops.report import by_method

    report = {"requests": [[m, s, sum(e[:-1])] for (m, s), e in total["answers"].items()],
              "hist": by_method(total["answers"]), "rx": 0, "tx": 0, "in_flight": {}, "volumes": [],
              "index": {"keys": 0, "db_bytes": 0, "disk_free": None, "pending": 0, "oldest_pending_seconds": None,
                        "write_error": None},
              "ready": True, "process": {"cpu_seconds": 0, "rss_bytes": 0, "open_fds": 0}, "workers": {},
              "version": "test"}
    got = {}
    for family in text_string_to_metric_families(render(report).decode()):
        for s in family.samples:
            got[(s.name, tuple(sorted(s.labels.items())))] = s.value
    buckets = [v for (name, labels), v in got.items()
               if name == "minikv_request_duration_seconds_bucket" and dict(labels)["method"] == "PUT"]
    assert buckets == sorted(buckets) and buckets[-1] == 2  # cumulative, +Inf is the count
    assert got[("minikv_request_duration_seconds_bucket", (("le", "0.25"), ("method", "PUT")))] == 2
    assert got[("minikv_request_duration_seconds_bucket", (("le", "0.1"), ("method", "PUT")))] == 0
    assert got[("minikv_requests_total", (("method", "GET"), ("status", "302")))] == 30

    assert redact(b"/k?X-Amz-Signature=abc&x=1&%6Dd5=zz") == "/k?X-Amz-Signature=REDACTED&x=1&%6Dd5=REDACTED"
    assert redact(b"/plain") == "/plain"
