"""`minikv status -server HOST:PORT`: the status page's facts in a terminal, as a table.

Exit code: 0 when the server is ready (its index takes writes, every volume is up), 1 when a
volume is down or the index cannot be written, 2 when no operations listener answers. So cron
and scripts can act on it.

`-server` may name the operations listener itself or the main port: the main port's URLs are all
keys, so for it the listener is looked for on PORT + 100, where `minikv up` puts it.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from minikv.ops.page import ms, size

TIMEOUT = 5.0
UP_OFFSET = 100


def fetch(address: str) -> dict | None:
    """The report of the operations listener at `address`, or None if it is not one."""
    try:
        with urllib.request.urlopen(f"http://{address}/status.json", timeout=TIMEOUT) as resp:
            if resp.headers.get("X-Minikv-Ops") != "1":
                return None
            return json.load(resp)
    except (OSError, ValueError, urllib.error.URLError):
        return None


def find(server: str) -> tuple[str, dict] | tuple[list[str], None]:
    host, _, port = server.rpartition(":")
    tried = [server]
    report = fetch(server)
    if report is None and port.isdigit():
        tried.append(f"{host}:{int(port) + UP_OFFSET}")
        report = fetch(tried[-1])
    return (tried[-1], report) if report is not None else (tried, None)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render(address: str, r: dict) -> str:
    index = r["index"]
    flying = r["in_flight"]
    lines = [f"minikv {r['version']} index :{r['server'].get('port', '?')}, operations {address}, "
             f"{len(r['workers'])} worker(s)"]
    state = "READY" if r["ready"] else "NOT READY: " + "; ".join(r["not_ready"])
    lines.append(state)
    lines.append(f"index: {index['keys']:,} keys, {size(index['db_bytes'])}, "
                 f"{'writable' if not index['write_error'] else 'NOT WRITABLE'}, {index['pending']} pending, "
                 f"in flight PUT {flying.get('PUT', 0)} DELETE {flying.get('DELETE', 0)}")
    points = r["rates"][-6:]
    if points:
        n = len(points)
        lines.append(f"requests (last {n * 10}s): {sum(p[1] for p in points) / n:.1f}/s, "
                     f"4xx {sum(p[2] for p in points) / n:.2f}/s, 5xx {sum(p[3] for p in points) / n:.2f}/s")
    rows = [["VOLUME", "STATE", "LATENCY", "USED", "FREE", "SIZE", "ERRORS", "WHY"]]
    for v in r["volumes"]:
        disk = v["disk"] or {}
        rows.append([v["host"], "up" if v["up"] else "DOWN", ms(v["latency"]), size(disk.get("used")),
                     size(disk.get("free")), size(disk.get("size")), str(v["errors"]), v["reason"] or ""])
    lines += ["", table(rows)]
    return "\n".join(lines)


def main(args) -> int:
    server = args.flags.get("server") or f"localhost:{args.flags.get('port', 3000)}"
    where, report = find(server)
    if report is None:
        print(f"minikv status: no operations listener answers at {' or '.join(where)}: start the server with "
              f"-metrics-port N and give -server HOST:N", file=sys.stderr)
        return 2
    try:
        shown = render(where, report)
        down = [v for v in report["volumes"] if not v["up"]]
        ready = report["ready"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # something else answered in its place
        print(f"minikv status: {where} answered with a status this version cannot read ({type(e).__name__}: "
              f"{e}): is it a minikv server of the same version?", file=sys.stderr)
        return 2
    print(shown)
    return 0 if ready and not down else 1
