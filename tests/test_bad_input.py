"""Bad input over real sockets: a clear 4xx with a reason, and the server keeps serving."""

import socket

import pytest
from cluster import HOST


def raw(cluster, data: bytes) -> bytes:
    with socket.create_connection((HOST, cluster.port), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize("data,status", [
    (b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"400"),
    (b"PUT /a%00b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"400"),
    (b"PUT /" + b"k" * 600 + b" HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"414"),
    (b"PUT /" + b"k" * 300 + b" HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"414"),
    (b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
    (b"PUT /x HTTP/1.1\r\n\r\n", b"411"),
    (b"GET /x HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
    (b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\n\r\n", b"414"),
    (b"NONSENSE\r\n\r\n", b"400"),
    (b"BREW /coffee HTTP/1.1\r\n\r\n", b"400"),
])
def test_bad_requests_get_a_4xx_with_a_reason(cluster, data, status):
    out = raw(cluster, data)
    assert out.split(b" ", 2)[1] == status, out[:200]
    if status != b"411":
        assert b"Content-Length: 0" not in out.split(b"\r\n\r\n")[0] or status == b"404"
    # and the server is still there
    assert cluster.put("/still/" + status.decode(), b"ok").status_code in (201, 403)


def test_long_get_key_is_just_missing(cluster):
    assert cluster.get("/" + "k" * 600, allow_redirects=False).status_code == 404


def test_delete_and_unlink_of_missing_key(cluster):
    assert cluster.delete("/never/was").status_code == 404
    assert cluster.request("UNLINK", "/never/was").status_code == 404


# Bad flags: the server stops at once with one line that says what to change, no traceback.
@pytest.mark.parametrize("flags,says", [
    (["-volumes", "a:1,b:2,a:1"], "-volumes names a:1 twice"),
    (["-volumes", "a:1", "-replicas", "1", "-db", "{file}"], "is a file, not a folder"),
    (["-volumes", "a:1", "-replicas", "1", "-db", "{file}/index"], "cannot be written"),
])
def test_bad_server_flags_get_one_line(tmp_path, flags, says):
    import subprocess
    import sys

    (tmp_path / "f").write_text("")
    args = [f.replace("{file}", str(tmp_path / "f")) for f in flags]
    if "-db" not in args:
        args += ["-db", str(tmp_path / "db")]
    out = subprocess.run([sys.executable, "-m", "minikv", "server", "-port", "1", *args],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr
