"""The operations listener: `/metrics`, `/healthz`, `/readyz`, `/status.json` and the page `/`.

On its own port (the main port's URL space is all keys). Every worker accepts on the one socket
the supervisor bound; each answer sums all workers (report.py), so which one answers does not
matter. One request per connection, GET or HEAD, a head of at most MAX_HEAD bytes read within
TIMEOUT seconds, at most MAX_CLIENTS at once per worker: a scraper, a load balancer and a person
need no more, and whatever else comes is answered with a 4xx and closed. When all are taken, a
new client drops the one that has waited longest without sending its head: connections that
send nothing cannot keep a health check out. `/healthz` never waits for the index (a stalled
PostgreSQL must not make a liveness probe fail and a healthy server restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from minikv.http.response import STATUS_LINES
from minikv.ops import metrics, page

MAX_HEAD = 8192
TIMEOUT = 5.0
MAX_CLIENTS = 32
OPS_HEADER = "X-Minikv-Ops: 1"  # tells `minikv status` it reached this listener, not the main port


def answer(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", head_only: bool = False,
           extra: str = "") -> bytes:
    head = (f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            f"{OPS_HEADER}\r\n{extra}Connection: close\r\n\r\n").encode()
    return STATUS_LINES[status] + head + (b"" if head_only else body)


class Listener:
    def __init__(self, reporter):
        self.reporter = reporter
        self.clients = 0
        self.waiting: dict[asyncio.StreamWriter, None] = {}  # still sending their head, oldest first

    def route(self, method: str, target: str) -> bytes:
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return answer(405, b"only GET and HEAD here\n", extra="Allow: GET, HEAD\r\n")
        path = target.partition("?")[0]
        if path == "/healthz":
            return answer(200, b"ok\n", head_only=head_only)
        if path == "/readyz":
            why = self.reporter.readiness()
            if why:
                return answer(503, ("not ready: " + "; ".join(why) + "\n").encode(), head_only=head_only)
            return answer(200, b"ready\n", head_only=head_only)
        if path == "/metrics":
            return answer(200, metrics.render(self.reporter.report()), metrics.CONTENT_TYPE, head_only)
        if path == "/status.json":
            return answer(200, json.dumps(self.reporter.report()).encode(), "application/json", head_only)
        if path == "/":
            return answer(200, page.render(self.reporter.report()), "text/html; charset=utf-8", head_only)
        return answer(404, b"not here: try /, /metrics, /healthz, /readyz or /status.json\n", head_only=head_only)

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS:
            if not self.waiting:  # every one is being answered: they will be done in a moment
                writer.write(answer(503, b"too many clients on the operations port\n"))
                writer.close()
                return
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            oldest.transport.abort()  # its read ends, and its task lets its place go
        self.clients += 1
        self.waiting[writer] = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            except asyncio.LimitOverrunError:
                writer.write(answer(431, b"request head too large\n"))
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            except asyncio.TimeoutError:
                writer.write(answer(408, f"request head not received within {TIMEOUT:g}s\n".encode()))
                return
            finally:
                self.waiting.pop(writer, None)
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                writer.write(answer(400, b"malformed HTTP request line\n"))
                return
            try:
                refresh = getattr(self.reporter, "refresh", None)
                if refresh is not None and parts[1].partition(b"?")[0] != b"/healthz":
                    await refresh()  # an index that answers over the network (ops/pg_facts.py)
                data = self.route(parts[0].decode("ascii"), parts[1].decode("ascii"))
            except UnicodeDecodeError:
                data = answer(400, b"request line is not ASCII\n")
            except Exception as e:  # noqa: BLE001 - a broken report costs one answer, not the worker
                data = answer(500, f"internal error: {e!r}\n".encode())
            writer.write(data)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.drain(), TIMEOUT)
        except (ConnectionError, OSError):
            pass
        finally:
            self.clients -= 1
            writer.close()

    async def serve(self, sock) -> asyncio.AbstractServer:
        return await asyncio.start_server(self.client, sock=sock, limit=MAX_HEAD)
