"""Only the index can write to volumes; signed redirects; limits."""

from __future__ import annotations

import socket
import time

import requests
from cluster import HOST

from minikv.placement import key2path

SECRET = "s3cr3t-for-tests-only"


def test_volumes_take_writes_and_listings_only_with_the_secret(make_cluster):
    c = make_cluster(volumes=2, replicas=2, flags=["-secret", SECRET], volume_flags=["-secret", SECRET])
    assert c.put("/sec/k", b"value").status_code == 201
    assert c.get("/sec/k").content == b"value"  # reads stay plain GETs
    loc = c.get("/sec/k", allow_redirects=False).headers["Location"]
    vol = loc.split("/")[2]
    assert requests.put(f"http://{vol}/sv00/evil", data=b"x").status_code == 403
    assert requests.delete(loc).status_code == 403
    assert requests.get(f"http://{vol}/").status_code == 403  # listings need it too
    assert requests.get(f"http://{vol}/", headers={"X-Minikv-Secret": SECRET}).status_code == 200
    # compared exactly: another case is another secret
    assert requests.delete(loc, headers={"X-Minikv-Secret": SECRET.upper()}).status_code == 403
    assert requests.get(loc).content == b"value"
    assert c.delete("/sec/k").status_code == 204
    assert requests.get(loc).status_code == 404


def test_index_without_the_secret_cannot_write(make_cluster):
    c = make_cluster(volumes=2, replicas=2, volume_flags=["-secret", SECRET])
    r = c.put("/nosecret", b"x")
    assert r.status_code == 502 and "403" in r.text
    assert c.get("/nosecret", allow_redirects=False).status_code == 404


def test_signed_redirects(make_cluster):
    c = make_cluster(volumes=2, replicas=1, flags=["-secret", SECRET, "-signed", "2s"],
                     volume_flags=["-secret", SECRET, "-signed", "1s"])
    assert c.put("/signed/k", b"signed value").status_code == 201
    loc = c.get("/signed/k", allow_redirects=False).headers["Location"]
    assert "md5=" in loc and "expires=" in loc
    assert requests.get(loc).content == b"signed value"
    unsigned = loc.split("?")[0]
    assert requests.get(unsigned).status_code == 403
    tampered = loc.replace("md5=", "md5=A")
    assert requests.get(tampered).status_code == 403
    time.sleep(3.1)
    assert requests.get(loc).status_code == 403  # expired
    assert c.get("/signed/k").content == b"signed value"  # a fresh redirect works


def test_max_value_size(make_cluster):
    c = make_cluster(volumes=1, replicas=1, flags=["-max-value-size", "1000"])
    assert c.put("/small", b"x" * 1000).status_code == 201
    r = c.put("/big", b"x" * 1001)
    assert r.status_code == 413 and "max-value-size" in r.text
    r = c.session.put(c.url("/bigchunked"), data=iter([b"x" * 600, b"y" * 600]))
    assert r.status_code == 413
    assert c.get("/big", allow_redirects=False).status_code == 404
    assert c.get("/bigchunked", allow_redirects=False).status_code == 404
    assert c.put("/bigchunked", b"ok").status_code == 201


def test_max_connections(make_cluster):
    c = make_cluster(volumes=1, replicas=1, workers=1, flags=["-max-connections", "3"])
    held = [socket.create_connection((HOST, c.port)) for _ in range(3)]
    time.sleep(0.2)
    extra = socket.create_connection((HOST, c.port))
    extra.settimeout(5)
    assert extra.recv(100).startswith(b"HTTP/1.1 503")
    for s in held:
        s.close()
    time.sleep(0.2)
    assert c.put("/after", b"x").status_code == 201


def test_keys_cannot_escape_the_volume(cluster):
    """Targets sent as they are (an HTTP library would remove the dot segments first): the key
    keeps its dots, and its file is named by the key's base64, inside the volume."""
    import http.client

    for target, key in [("/../../etc/passwd", "/../../etc/passwd"), ("/a/%2e%2e/%2e%2e/x", "/a/../../x"),
                        ("/..%2f..%2fx", "/../../x"), ("/%2e%2e", "/..")]:
        conn = http.client.HTTPConnection(HOST, cluster.port, timeout=10)
        conn.request("PUT", target, body=f"inside {key}".encode())
        put = conn.getresponse()
        put.read()
        status = put.status
        conn.request("GET", target)
        r = conn.getresponse()
        r.read()
        conn.close()
        assert status in (201, 403), (target, status)  # 403: an earlier target decoded to the same key
        assert r.status == 302, (target, r.status)
        loc = r.getheader("Location")
        assert loc.endswith(key2path(key.encode())), (target, loc)  # the decoded key, dots and all
        assert ".." not in loc.split("/", 3)[3]
        assert requests.get(loc).content.startswith(b"inside ")
        assert cluster.session.get(f"http://{HOST}:{cluster.port}/?list").json()["keys"].count(key) == 1
