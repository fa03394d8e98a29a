"""The minikeyvalue API, black-box over HTTP against a real cluster (nginx volumes + index)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import requests

from minikv.placement import key2path, key2volume

# every test here runs on both index engines (tests/conftest.py: engine, tests/pg.py)
pytestmark = pytest.mark.parametrize("engine", ["lmdb", "postgresql"], indirect=True, scope="module")


def fresh(prefix: str = "/t/") -> str:
    return prefix + uuid.uuid4().hex


def list_in_pages(cluster, prefix: str, limit: int, most: int = 20) -> list[str]:
    """Every key under `prefix`, read with ?list&limit=N, following `next`."""
    got, start = [], ""
    for _ in range(most):
        page = cluster.get(f"{quote(prefix)}?list&limit={limit}" + (f"&start={quote(start)}" if start else "")).json()
        got += page["keys"]
        start = page["next"]
        if not start:
            return got
    raise AssertionError(f"still paging after {most} pages")


def test_put_get_delete_round_trip(cluster):
    key = fresh()
    assert cluster.put(key, b"bigswag").status_code == 201
    r = cluster.get(key, allow_redirects=False)
    assert r.status_code == 302
    assert r.headers["Content-Length"] == "0"
    assert r.headers["Content-Md5"] == hashlib.md5(b"bigswag").hexdigest()
    assert r.headers["Key-Balance"] == "balanced"
    assert len(r.headers["Key-Volumes"].split(",")) == 3
    assert r.headers["Location"].startswith("http://")
    assert cluster.get(key).content == b"bigswag"
    assert cluster.request("HEAD", key, allow_redirects=False).status_code == 302
    assert cluster.delete(key).status_code == 204
    r = cluster.get(key, allow_redirects=False)
    assert r.status_code == 404 and r.headers["Content-Length"] == "0" and r.content == b""
    assert "Date" in r.headers
    assert cluster.delete(key).status_code == 404


def test_put_existing_is_403_and_empty_is_411(cluster):
    key = fresh()
    assert cluster.put(key, b"one").status_code == 201
    assert cluster.put(key, b"two").status_code == 403
    assert cluster.get(key).content == b"one"
    assert cluster.put(fresh(), b"").status_code == 411


def test_binary_16mb_value(cluster):
    data = os.urandom(16 << 20)
    key = fresh()
    assert cluster.put(key, data).status_code == 201
    r = cluster.get(key)
    assert r.status_code == 200 and r.content == data
    assert cluster.get(key, allow_redirects=False).headers["Content-Md5"] == hashlib.md5(data).hexdigest()


def test_chunked_upload(cluster):
    key = fresh()
    parts = [os.urandom(100_000) for _ in range(7)]
    r = cluster.session.put(cluster.url(key), data=iter(parts))  # a generator body is sent chunked
    assert r.status_code == 201
    assert cluster.get(key).content == b"".join(parts)


def test_empty_chunked_upload_is_411_and_stores_nothing(cluster):
    key = fresh()
    r = cluster.session.put(cluster.url(key), data=iter([b""]), headers={"Transfer-Encoding": "chunked"})
    assert r.status_code == 411
    assert cluster.get(key, allow_redirects=False).status_code == 404
    assert cluster.put(key, b"x").status_code == 201


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_upload_with_expect_continue(cluster, tmp_path):
    path = tmp_path / "file.bin"
    data = os.urandom(5 << 20)
    path.write_bytes(data)
    key = fresh()
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(path),
                          cluster.url(key)], capture_output=True, text=True, timeout=60)
    assert out.stdout == "201", out.stderr
    got = subprocess.run(["curl", "-sS", "-L", cluster.url(key)], capture_output=True, timeout=60).stdout
    assert got == data
    # a refused PUT answers before curl sends the body
    again = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}", "-T",
                            str(path), cluster.url(key)], capture_output=True, text=True, timeout=60)
    code, sent = again.stdout.split()
    assert code == "403" and float(sent) < len(data)


@pytest.mark.parametrize("key", [
    "/with space", "/ünïcödé/ключ", "/a/b/c/deep/path", "/what?.txt", "/100%", "/plus+sign", "/semi;colon",
    "/" + "k" * 180,
])
def test_odd_keys(cluster, key):
    url_path = quote(key, safe="/")
    url = f"http://127.0.0.1:{cluster.port}{url_path}"
    data = key.encode() * 3
    assert cluster.session.put(url, data=data).status_code == 201
    r = cluster.session.get(url, allow_redirects=False)
    assert r.status_code == 302
    assert r.headers["Location"].endswith(key2path(key.encode()))
    assert cluster.session.get(url).content == data
    listed = cluster.session.get(f"http://127.0.0.1:{cluster.port}{quote(key[:2], safe='/')}?list").json()
    assert key in listed["keys"]
    assert cluster.session.delete(url).status_code == 204


def test_key_whose_file_name_would_be_a_folder_is_400(cluster):
    assert base64.b64encode(b"/what?").endswith(b"/")
    r = cluster.session.put(f"http://127.0.0.1:{cluster.port}/what%3F", data=b"x")
    assert r.status_code == 400 and "layout" in r.text


def test_query_string_is_not_part_of_the_key(cluster):
    key = fresh()
    assert cluster.put(key, b"q").status_code == 201
    assert cluster.get(key + "?foo=bar").content == b"q"


def test_list_and_pages(cluster):
    prefix = fresh("/list-")
    keys = sorted(f"{prefix}/{i:03d}" for i in range(25))
    for k in keys:
        assert cluster.put(k, b"v").status_code == 201
    r = cluster.get(prefix + "?list")
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"next": "", "keys": keys}
    assert list_in_pages(cluster, prefix, 10) == keys
    # unlinked keys are not listed, but are by ?unlinked
    assert cluster.request("UNLINK", keys[0]).status_code == 204
    assert keys[0] not in cluster.get(prefix + "?list").json()["keys"]
    assert cluster.get(prefix + "?unlinked").json()["keys"] == [keys[0]]


def test_unlink_cycle(cluster):
    key = fresh()
    assert cluster.request("UNLINK", key).status_code == 404
    assert cluster.put(key, b"data").status_code == 201
    loc = cluster.get(key, allow_redirects=False).headers["Location"]
    assert cluster.request("UNLINK", key).status_code == 204
    assert cluster.request("UNLINK", key).status_code == 404  # as minikeyvalue: already unlinked
    assert cluster.get(key, allow_redirects=False).status_code == 404
    assert requests.get(loc).content == b"data"  # virtual delete: the file is still there
    assert key in cluster.get("/?unlinked").json()["keys"]
    assert cluster.delete(key).status_code == 204
    assert requests.get(loc).status_code == 404
    assert key not in cluster.get("/?unlinked").json()["keys"]


def test_put_over_unlinked_key(cluster):
    key = fresh()
    assert cluster.put(key, b"old").status_code == 201
    assert cluster.request("UNLINK", key).status_code == 204
    assert cluster.put(key, b"new").status_code == 201
    assert cluster.get(key).content == b"new"


def test_range_through_redirect(cluster):
    key = fresh()
    data = bytes(range(256)) * 100
    assert cluster.put(key, data).status_code == 201
    r = cluster.get(key, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]


def test_placement_and_files_on_disk(cluster):
    key = fresh("/placed/")
    assert cluster.put(key, b"where am i").status_code == 201
    expected = key2volume(key.encode(), cluster.names, cluster.replicas, cluster.subvolumes)
    r = cluster.get(key, allow_redirects=False)
    assert r.headers["Key-Volumes"] == ",".join(expected)
    md5 = hashlib.md5(key.encode()).digest()
    b64 = base64.b64encode(key.encode()).decode()
    for volume in expected:
        sub = volume.split("/", 1)[1]
        assert sub.startswith("sv") and len(sub) == 4
        path = cluster.volume_dir(volume) / f"{md5[0]:02x}" / f"{md5[1]:02x}" / b64
        assert path.read_bytes() == b"where am i"


def test_concurrent_puts_of_one_key_exactly_one_wins(cluster):
    key = fresh()
    barrier = threading.Barrier(8)

    def put(i):
        s = requests.Session()
        barrier.wait()
        return s.put(cluster.url(key), data=os.urandom(200_000) + bytes([i])).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(put, range(8)))
    assert codes.count(201) == 1, codes
    assert set(codes) <= {201, 403, 409}
    assert cluster.get(key).status_code == 200


def test_threads_put_get_delete_without_error(cluster):
    errors = []

    def worker(t):
        s = requests.Session()
        for i in range(40):
            key = f"/thrash/{t}/{i}/{uuid.uuid4().hex}"
            data = f"{t}-{i}".encode() * 10
            steps = [(s.put(cluster.url(key), data=data).status_code, 201),
                     (s.get(cluster.url(key), allow_redirects=False).status_code, 302),
                     (s.delete(cluster.url(key)).status_code, 204)]
            errors.extend((key, got, want) for got, want in steps if got != want)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_rebalance_of_a_balanced_key(cluster):
    key = fresh()
    assert cluster.put(key, b"r").status_code == 201
    assert cluster.request("REBALANCE", key).status_code == 204
    assert cluster.request("REBALANCE", fresh()).status_code == 404


def test_unknown_method_is_405(cluster):
    assert cluster.request("PATCH", fresh()).status_code == 405


def test_protect_needs_unlink_before_delete(make_cluster):
    c = make_cluster(flags=["-protect"])
    assert c.put("/p/k", b"keep").status_code == 201
    r = c.delete("/p/k")
    assert r.status_code == 403 and "UNLINK" in r.text
    assert c.get("/p/k").content == b"keep"
    assert c.request("UNLINK", "/p/k").status_code == 204
    assert c.delete("/p/k").status_code == 204


def test_fallback_redirects_missing_keys(make_cluster):
    other = make_cluster(volumes=1, replicas=1)
    assert other.put("/old/file", b"from the old cluster").status_code == 201
    c = make_cluster(flags=["-fallback", f"127.0.0.1:{other.port}"])
    r = c.get("/old/file", allow_redirects=False)
    assert r.status_code == 302
    assert r.headers["Location"] == f"http://127.0.0.1:{other.port}/old/file"
    assert c.get("/old/file").content == b"from the old cluster"  # followed twice
    assert c.put("/new", b"n").status_code == 201
    assert c.get("/new").content == b"n"


def test_md5sum_off_stores_no_hash(make_cluster):
    c = make_cluster(flags=["-md5sum=false"])
    assert c.put("/nohash", b"x").status_code == 201
    r = c.get("/nohash", allow_redirects=False)
    assert r.status_code == 302 and "Content-Md5" not in r.headers


def test_verify_get_mode_checks_a_replica(make_cluster):
    c = make_cluster(volumes=3, replicas=1, flags=["-verify-get"])
    assert c.put("/vg", b"x").status_code == 201
    r = c.get("/vg", allow_redirects=False)
    assert r.status_code == 302
    loc = r.headers["Location"]
    requests.delete(loc)  # the file vanishes behind the index's back
    assert c.get("/vg", allow_redirects=False).status_code == 404


def test_rebalance_moves_a_key_after_volumes_change(make_cluster):
    c = make_cluster(volumes=4, replicas=2)
    keys = [fresh("/rb/") for _ in range(30)]
    for k in keys:
        assert c.put(k, k.encode()).status_code == 201
    # a new index with one volume fewer: keys placed on it are now unbalanced
    names = c.names[:3]
    c.index.stop()
    c.index = c._index(2, [])
    c.index.args[c.index.args.index("-volumes") + 1] = ",".join(names)
    c.index.start()
    moved = 0
    for k in keys:
        r = c.get(k, allow_redirects=False)
        if r.headers["Key-Balance"] == "unbalanced":
            assert c.request("REBALANCE", k).status_code == 204
            moved += 1
        r = c.get(k, allow_redirects=False)
        assert r.headers["Key-Balance"] == "balanced"
        assert r.headers["Key-Volumes"] == ",".join(key2volume(k.encode(), names, 2, 10))
        assert c.get(k).content == k.encode()
    assert moved > 0


def test_list_pages_through_unicode_keys(cluster):
    prefix = fresh("/uni-")
    keys = sorted(f"{prefix}/ключ-{i}" for i in range(5))
    for k in keys:
        assert cluster.session.put(cluster.url(quote(k)), data=b"v").status_code == 201
    assert list_in_pages(cluster, prefix, 2) == keys
