"""An S3 GET of a big object through the index, old code against new, and the floor a proxy
can reach on this machine, all in one run on the same volumes and the same file.

botocore follows no redirect, so an S3 GET streams the value through the index: volume ->
index -> client. Each round GETs the file (curl, an unsigned request with x-amz-date so it is
S3's, into /dev/null) in turn, mirrored from one round to the next:
- straight from the volume's nginx (the reference of bench/run.py's row),
- through the old index (`--old`: the minikv command of a checkout of the code before),
- through this checkout's index,
- through nginx as a reverse proxy (`proxy_pass` to the volume, unbuffered): a C proxy, one
  user-space copy per byte, the floor of what a copying proxy costs here,
- through a splice forwarder (os.splice volume socket -> pipe -> client socket: no copy in
  user space), the floor of any proxy.
Medians of the rounds, as ratios to nginx's direct GET, and the CPU seconds the process in the
middle spent per GET (the index's workers, the proxy's worker, the forwarder's thread; for the
direct GET, the volume's nginx): on a shared machine the wall time moves with the other load, the
CPU time much less.

    .venv/bin/python bench/s3get_ab.py --old ../main/.venv/bin/minikv [--mb 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402 - bench/ is not a package
    HOST,
    REPLICAS,
    SUBVOLUMES,
    BenchError,
    Cluster,
    cpu_seconds,
    curl_get,
    curl_md5,
    curl_put,
    default_dir,
    descendants,
    free_ports,
    http_request,
    random_file,
    wait_http,
)

S3_GET = ["-H", "x-amz-date: 20250101T000000Z"]  # an S3 request, unsigned: the client costs nothing
F_SETPIPE_SZ = 1031


def start_index(cluster: Cluster, name: str, exe: str, db: Path, port: int):
    volumes = ",".join(f"{HOST}:{p}" for p in cluster.volume_ports)
    proc = cluster.start(name, [exe, "server", "-host", HOST, "-port", str(port), "-volumes", volumes,
                                "-db", str(db), "-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES)], port)
    wait_http(proc, timeout=30)
    return proc


def start_proxy(cluster: Cluster, port: int, upstream: str):
    """nginx as a reverse proxy to one volume, unbuffered (no spooling of the answer to disk)."""
    folder = cluster.tmp / "proxy"
    folder.mkdir()
    conf = folder / "nginx.conf"
    conf.write_text(f"""daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log stderr warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_buffer_size 256k;
            proxy_buffers 4 256k;
            proxy_busy_buffers_size 256k;
        }}
    }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = cluster.start("proxy", [nginx, "-e", "stderr", "-p", str(folder), "-c", str(conf)], port)
    wait_http(proc, timeout=20)
    return proc


def _head(sock: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP head read from `sock` and the bytes after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise OSError("closed before the end of the head")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _forward(client: socket.socket, upstream: tuple[str, int]) -> None:
    """One GET: the request to the volume, then its answer spliced through a pipe to the client."""
    with client, socket.create_connection(upstream) as up:
        request, _ = _head(client)
        up.sendall(request)
        head, rest = _head(up)
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        client.sendall(head + rest)
        left = length - len(rest)
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
            while left > 0:
                n = os.splice(up.fileno(), w, min(left, 1 << 20))
                if n == 0:
                    raise OSError("the volume closed mid-answer")
                left -= n
                while n:
                    n -= os.splice(r, client.fileno(), n)
        finally:
            os.close(r)
            os.close(w)


def splice_forwarder(port: int, upstream: tuple[str, int], stop: threading.Event) -> None:
    """Serve GETs on `port` (loopback) one connection at a time, in a thread, until `stop`."""
    listener = socket.create_server((HOST, port))
    listener.settimeout(0.2)

    def serve() -> None:
        with listener:
            while not stop.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                client.setblocking(True)  # os.splice needs blocking sockets
                try:
                    _forward(client, upstream)
                except OSError as e:
                    print(f"splice forwarder: {e}", file=sys.stderr)

    threading.Thread(target=serve, daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the minikv command of the code to compare against")
    ap.add_argument("--mb", type=int, default=256, help="size of the object")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of one GET each way, mirrored in turn")
    ap.add_argument("--only", help="comma-separated names of the ways to measure (default: all)")
    opts = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="minikv-s3get-", dir=default_dir()))
    tmp.chmod(0o755)
    cluster = Cluster(tmp)
    stop = threading.Event()
    try:
        cluster.up()  # this checkout's index is "index"
        old_port, proxy_port, splice_port = free_ports(3)
        old = start_index(cluster, "old", opts.old, tmp / "index-old", old_port)
        path = tmp / "big.bin"
        want = random_file(path, opts.mb)
        # both indexes store it: same key, same placement, same bytes on the volumes
        for port in (cluster.index_port, old_port):
            curl_put(path, f"http://{HOST}:{port}/bench/get")
        path.unlink()
        status, headers, _ = http_request(cluster.index_port, "GET", "/bench/get")
        location = headers.get("Location", "")
        if status != 302:
            raise BenchError(f"the plain API answered {status} for the stored value")
        volume, _, rest = location.removeprefix("http://").partition("/")
        proxy = start_proxy(cluster, proxy_port, volume)
        host, _, vport = volume.rpartition(":")
        splice_forwarder(splice_port, (host, int(vport)), stop)
        urls = {
            "nginx": (location, []),
            "old index": (f"http://{HOST}:{old_port}/bench/get", S3_GET),
            "new index": (f"http://{HOST}:{cluster.index_port}/bench/get", S3_GET),
            "nginx proxy": (f"http://{HOST}:{proxy_port}/{rest}", []),
            "splice": (f"http://{HOST}:{splice_port}/{rest}", []),
        }
        for name, (url, extra) in urls.items():
            if curl_md5(url, extra) != want:
                raise BenchError(f"{name}: the bytes are not the file's")
        served = next(p for p in cluster.procs if p.port == int(vport))
        middle = {"nginx": served, "old index": old, "new index": cluster.index, "nginx proxy": proxy}
        times: dict[str, list[float]] = {name: [] for name in urls}
        cpu: dict[str, list[float]] = {name: [] for name in urls}
        order = [n for n in urls if not opts.only or n in opts.only.split(",")]
        for n in range(opts.rounds):
            for name in (order if n % 2 == 0 else order[::-1]):
                url, extra = urls[name]
                pids = descendants(middle[name].popen.pid) if name in middle else []
                before = cpu_seconds(pids) if pids else time.process_time()
                times[name].append(curl_get(url, extra))
                cpu[name].append((cpu_seconds(pids) if pids else time.process_time()) - before)
        ref = statistics.median(times["nginx"])
        print(f"S3 GET of {opts.mb} MB, {opts.rounds} rounds: median seconds, ratio to nginx's direct GET, "
              "CPU seconds of the one in the middle")
        for name, secs in times.items():
            if not secs:
                continue
            med = statistics.median(secs)
            print(f"  {name:12} {med:6.3f} s  {med / ref:5.2f}x  cpu {statistics.median(cpu[name]):5.2f} s"
                  f"   ({' / '.join(f'{t:.3f}' for t in secs)})")
        return 0
    except BenchError as e:
        print(f"s3get_ab: {e}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
