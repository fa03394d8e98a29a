"""One access model for the index port: with S3 credentials set, the plain API needs them too
(HTTP Basic), unless -open-api opens it on purpose; secrets stay out of ps, logs and other
users' reach."""

from __future__ import annotations

import base64
import os
import socket
import stat
import subprocess
import sys
import time

import boto3
import pytest
import requests
from botocore.config import Config as BotoConfig
from cluster import HOST

from minikv.api.access import Access, basic_header
from minikv.http.response import HTTPError
from minikv.private import argv_warnings, redact_target

AK = "AKIDACCESS"
SK = "s3cr3t:with/odd+chars"
AUTH = (AK, SK)


@pytest.fixture
def creds(monkeypatch):
    """The credentials in the environment (as `minikv up` hands them over), not in argv."""
    monkeypatch.setenv("MINIKV_S3_ACCESS_KEY", AK)
    monkeypatch.setenv("MINIKV_S3_SECRET_KEY", SK)


def s3_client(port: int, secret: str = SK):
    return boto3.client("s3", endpoint_url=f"http://{HOST}:{port}", aws_access_key_id=AK,
                        aws_secret_access_key=secret, region_name="us-east-1",
                        config=BotoConfig(signature_version="s3v4", s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))


def refused(r: requests.Response, why: str = "credentials") -> bool:
    return (r.status_code == 401 and r.headers.get("WWW-Authenticate") == 'Basic realm="minikv"'
            and why in r.text)


# ---------------------------------------------------------------- pure parts

def test_basic_credentials_are_checked_exactly():
    a = Access(AK, SK)
    a.check(b"PUT", [(b"authorization", basic_header(AK, SK).encode())])
    a.check(b"GET", [(b"authorization", b"basic " + basic_header(AK, SK).encode()[6:])])  # scheme: any case
    bad = [
        [],
        [(b"authorization", basic_header(AK, SK + "x").encode())],
        [(b"authorization", basic_header(AK + "x", SK).encode())],
        [(b"authorization", basic_header(AK, SK.upper()).encode())],
        [(b"authorization", b"Basic " + base64.b64encode(AK.encode()))],  # no colon
        [(b"authorization", b"Basic not*base64")],
        [(b"authorization", b"Bearer " + SK.encode())],
        [(b"authorization", b"")],
    ]
    for headers in bad:
        with pytest.raises(HTTPError) as e:
            a.check(b"GET", headers)
        assert e.value.status == 401 and ("WWW-Authenticate", 'Basic realm="minikv"') in e.value.headers, headers
    reads = Access(AK, SK, "read")
    reads.check(b"GET", [])
    reads.check(b"HEAD", [])
    for method in (b"PUT", b"DELETE", b"UNLINK", b"REBALANCE", b"POST"):
        with pytest.raises(HTTPError, match="writes need credentials"):
            reads.check(method, [])


def test_logged_targets_lose_their_signatures():
    assert redact_target(b"/k") == "/k"
    assert redact_target(b"/k?list&limit=3") == "/k?list&limit=3"
    assert redact_target(b"/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=abcdef&X-Amz-Expires=60") == \
        "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=REDACTED&X-Amz-Expires=60"
    assert redact_target(b"/b/k?AWSAccessKeyId=AK&Signature=c2ln%3D&Expires=1") == \
        "/b/k?AWSAccessKeyId=AK&Signature=REDACTED&Expires=1"
    assert redact_target(b"/sv01/ab/cd/x?md5=SIG&expires=9") == "/sv01/ab/cd/x?md5=REDACTED&expires=9"
    assert redact_target(b"/k?x-amz-security-token=T&X-Amz-Sign%61ture=S") == \
        "/k?x-amz-security-token=REDACTED&X-Amz-Sign%61ture=REDACTED"


def test_secret_flags_are_named_in_a_warning():
    assert argv_warnings({"port", "v"}) == []
    lines = argv_warnings({"secret", "s3-secret-key", "s3-access-key"})
    assert len(lines) == 2 and "MINIKV_SECRET" in lines[0] and "MINIKV_S3_SECRET_KEY" in lines[1]
    assert all(SK not in line for line in lines)


# ---------------------------------------------------------------- a real server

def test_plain_api_needs_the_credentials_when_they_are_set(make_cluster, creds):
    """The hole: with S3 credentials set, a client that left the S3 headers off read, wrote,
    listed and deleted everything through the plain API (and got signed volume URLs)."""
    c = make_cluster(volumes=2, replicas=1, workers=1)
    s = requests.Session()
    for method, key, kw in [("PUT", "/acc/k", {"data": b"stolen"}), ("GET", "/acc/k", {}), ("HEAD", "/acc/k", {}),
                            ("GET", "/acc/?list", {}), ("GET", "/?unlinked", {}), ("DELETE", "/acc/k", {}),
                            ("UNLINK", "/acc/k", {}), ("REBALANCE", "/acc/k", {})]:
        r = s.request(method, c.url(key), allow_redirects=False, **kw)
        assert refused(r, "" if method == "HEAD" else "curl -u"), (method, key, r.status_code, r.text)
    assert refused(s.put(c.url("/acc/k"), data=b"x", auth=(AK, "wrong")), "wrong credentials")
    assert refused(s.put(c.url("/acc/k"), data=b"x", auth=("other", SK)), "wrong credentials")
    # with them (curl -u AK:SK): the whole API, as before
    assert s.put(c.url("/acc/k"), data=b"value", auth=AUTH).status_code == 201
    r = s.get(c.url("/acc/k"), auth=AUTH, allow_redirects=False)
    assert r.status_code == 302 and "Key-Volumes" in r.headers
    assert requests.get(r.headers["Location"]).content == b"value"
    assert s.get(c.url("/acc/?list"), auth=AUTH).json()["keys"] == ["/acc/k"]
    assert s.request("UNLINK", c.url("/acc/k"), auth=AUTH).status_code == 204
    assert s.get(c.url("/?unlinked"), auth=AUTH).json()["keys"] == ["/acc/k"]
    assert s.delete(c.url("/acc/k"), auth=AUTH).status_code == 204
    # nothing the refused requests sent was stored
    assert s.get(c.url("/acc/k"), auth=AUTH, allow_redirects=False).status_code == 404
    # S3 clients sign, as before; a bad signature is still S3's 403
    s3 = s3_client(c.port)
    s3.put_object(Bucket="acc", Key="o", Body=b"s3 value")
    assert s3.get_object(Bucket="acc", Key="o")["Body"].read() == b"s3 value"
    assert s.get(c.url("/acc/o"), auth=AUTH).content == b"s3 value"
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        s3_client(c.port, "wrong").get_object(Bucket="acc", Key="o")
    log = c.index.log.read_text()
    assert "plain API is closed to requests without HTTP Basic" in log, log
    assert "volumes take writes from anyone" in log  # no -secret: the server says what stays open


def test_a_refused_upload_is_refused_before_its_body(make_cluster, creds):
    c = make_cluster(volumes=1, replicas=1, workers=1)
    with socket.create_connection((HOST, c.port), timeout=5) as sock:
        sock.sendall(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in head
    assert b'WWW-Authenticate: Basic realm="minikv"' in head
    # a refused HEAD has no body, which the next answer on the connection would be taken for
    with socket.create_connection((HOST, c.port), timeout=5) as sock:
        sock.sendall(b"HEAD /big HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /missing HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic_header(AK, SK).encode()
                     + b"\r\n\r\n")
        data = b""
        while data.count(b"\r\n\r\n") < 2:
            data += sock.recv(4096)
    first, rest = data.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 401 ") and rest.startswith(b"HTTP/1.1 404 "), data
    # the server keeps serving, and a refused request on a kept-alive connection spoils nothing
    s = requests.Session()
    assert s.put(c.url("/big"), data=b"x" * 100_000).status_code == 401
    assert s.put(c.url("/big"), data=b"small", auth=AUTH).status_code == 201


def test_open_api_read_leaves_reads_open_and_writes_closed(make_cluster, creds):
    c = make_cluster(volumes=1, replicas=1, workers=1, flags=["-open-api", "read"])
    deadline = time.monotonic() + 10  # the port opens before the start notes are logged
    while "plain API is open to anyone for reads" not in c.index.log.read_text():
        assert time.monotonic() < deadline, c.index.log.read_text()
        time.sleep(0.05)
    assert refused(c.put("/r/k", b"x"), "writes need credentials")
    assert c.put("/r/k", b"public", auth=AUTH).status_code == 201
    assert c.get("/r/k").content == b"public"
    assert c.request("HEAD", "/r/k", allow_redirects=False).status_code == 302
    assert c.get("/r/?list").json()["keys"] == ["/r/k"]
    for method in ("DELETE", "UNLINK", "REBALANCE"):
        assert refused(c.request(method, "/r/k")), method
    # S3 still signs, even for reads
    r = requests.get(c.url("/r/k"), headers={"x-amz-date": "20260101T000000Z"})
    assert r.status_code == 403
    assert c.request("DELETE", "/r/k", auth=AUTH).status_code == 204


def test_open_api_all_is_todays_behaviour_for_the_plain_api(make_cluster, creds):
    c = make_cluster(volumes=1, replicas=1, workers=1, flags=["-open-api", "all"])
    assert c.put("/o/k", b"open").status_code == 201
    assert c.get("/o/k").content == b"open"
    assert c.delete("/o/k").status_code == 204
    r = requests.get(c.url("/o/k"), headers={"x-amz-date": "20260101T000000Z"})
    assert r.status_code == 403  # S3 requests are checked all the same


def test_without_credentials_the_port_is_open_as_before(cluster):
    assert cluster.put("/nocreds/k", b"v").status_code == 201
    # an Authorization the server has no use for is ignored, as minikeyvalue ignores it
    assert cluster.get("/nocreds/k", auth=("any", "thing")).content == b"v"
    assert cluster.delete("/nocreds/k").status_code == 204


def _server(tmp: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minikv", "server", "-volumes", "127.0.0.1:1", "-replicas", "1",
                           "-db", os.path.join(tmp, "index"), *flags], capture_output=True, text=True,
                          timeout=30, env=env or {k: v for k, v in os.environ.items() if not k.startswith("MINIKV_")})


def test_open_api_needs_credentials_and_a_known_value(tmp_path):
    r = _server(str(tmp_path), "-open-api", "read")
    assert r.returncode == 2 and "-open-api read" in r.stderr and "MINIKV_S3_SECRET_KEY" in r.stderr
    r = _server(str(tmp_path), "-open-api", "writes", env=dict(os.environ, MINIKV_S3_ACCESS_KEY=AK,
                                                                 MINIKV_S3_SECRET_KEY=SK))
    assert r.returncode == 2 and "give none, read or all" in r.stderr


def test_secret_key_file(make_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("MINIKV_S3_SECRET_KEY", raising=False)
    path = tmp_path / "s3-secret"
    path.write_text(SK + "\n")
    c = make_cluster(volumes=1, replicas=1, workers=1,
                     flags=["-s3-access-key", AK, "-s3-secret-key-file", str(path)])
    assert refused(c.put("/f/k", b"x"))
    assert c.put("/f/k", b"x", auth=AUTH).status_code == 201
    assert s3_client(c.port).get_object(Bucket="f", Key="k")["Body"].read() == b"x"
    log = c.index.log.read_text()
    assert "visible to every user" not in log and SK not in log
    r = _server(str(tmp_path), "-s3-access-key", AK, "-s3-secret-key-file", str(tmp_path / "missing"))
    assert r.returncode == 2 and "cannot read -s3-secret-key-file" in r.stderr and "missing" in r.stderr


def test_secret_flags_warn_at_start(make_cluster):
    secret = "volume-secret-for-tests"
    c = make_cluster(volumes=1, replicas=1, workers=1, volume_flags=["-secret", secret],
                     flags=["-s3-access-key", AK, "-s3-secret-key", SK, "-secret", secret])
    log = c.index.log.read_text()
    assert "-s3-secret-key on the command line is visible to every user" in log, log
    assert "-secret on the command line is visible to every user" in log
    assert "MINIKV_S3_SECRET_KEY" in log and "MINIKV_SECRET" in log and SK not in log and secret not in log
    assert "volumes take writes from anyone" not in log
    assert "-secret on the command line" in c.volumes[0].log.read_text()  # every command warns
    assert c.put("/w/k", b"x", auth=AUTH).status_code == 201


def test_verbose_log_shows_no_signature(make_cluster, creds):
    c = make_cluster(volumes=1, replicas=1, workers=1, flags=["-v"])
    s3 = s3_client(c.port)
    s3.put_object(Bucket="v", Key="k", Body=b"x")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "v", "Key": "k"}, ExpiresIn=60)
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    assert requests.get(url).content == b"x"
    requests.get(c.url("/v/k?md5=SECRETMD5VALUE&expires=1"), auth=AUTH, allow_redirects=False)
    time.sleep(0.2)
    log = c.index.log.read_text()
    assert "X-Amz-Signature=REDACTED" in log and "md5=REDACTED" in log, log
    assert signature not in log and "SECRETMD5VALUE" not in log
    assert SK not in log and basic_header(AK, SK)[6:] not in log


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_index_files_are_the_servers_alone(make_cluster):
    c = make_cluster(volumes=1, replicas=1, workers=1)
    db = c.root / "index"
    assert c.put("/p/k", b"x").status_code == 201
    for path in (db, db / "data.mdb", db / "lock.mdb", db / "minikv-server.lock", db / "s3", db / "s3" / "data.mdb"):
        assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))
    # an index made before (world-readable) is made private at the next start
    (db / "data.mdb").chmod(0o644)
    c.restart_index(workers=1)
    assert _mode(db / "data.mdb") == 0o600
    assert c.get("/p/k").content == b"x"
    # the volumes' files stay nginx's to read
    assert requests.get(c.get("/p/k", allow_redirects=False).headers["Location"]).content == b"x"


def test_online_rebalance_sends_the_credentials_from_the_environment(make_cluster, creds):
    c = make_cluster(volumes=3, replicas=1, subvolumes=1, workers=1)
    c.restart_index(workers=1, flags=["-volumes", ",".join(c.names[:2])])
    for i in range(30):
        assert c.put(f"/rb/{i}", b"v", auth=AUTH).status_code == 201
    c.restart_index(workers=1)
    cmd = [sys.executable, "-m", "minikv", "rebalance", "-server", f"{HOST}:{c.port}"]
    bare = {k: v for k, v in os.environ.items() if not k.startswith("MINIKV_")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=bare)
    assert r.returncode == 1 and "MINIKV_S3_ACCESS_KEY" in r.stderr, r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    moved = int(r.stderr.split(" moved")[0].rsplit(" ", 1)[1])
    assert moved > 0, r.stderr
    for i in range(30):
        r = c.get(f"/rb/{i}", auth=AUTH, allow_redirects=False)
        assert r.headers["Key-Balance"] == "balanced", i
