"""`/`: the status page a person reads. Server-rendered HTML, no script, no build step: it
reloads itself every few seconds and fits a phone (one column, tables that scroll sideways)."""

from __future__ import annotations

import time
from html import escape

REFRESH = 5  # seconds

STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;padding:12px;max-width:1100px;color:#1b1f24}
h1{font-size:20px;margin:4px 0}h2{font-size:16px;margin:18px 0 6px}
.wrap{overflow-x:auto}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #ddd;white-space:nowrap}
td.vol small{display:block;white-space:normal;max-width:22em;color:#b00020}
.up{color:#0a7a2f;font-weight:600}.down{color:#b00020;font-weight:700}
.banner{padding:8px 10px;border-radius:6px;margin:8px 0}
.ok{background:#e6f4ea}.bad{background:#fde7ea}
.bar{display:inline-block;width:80px;height:8px;background:#e5e7eb;border-radius:4px;vertical-align:middle}
.bar i{display:block;height:8px;border-radius:4px;background:#2563eb}
.spark{display:flex;align-items:flex-end;gap:2px;height:40px}
.spark i{display:block;width:8px;background:#2563eb}.spark i.err{background:#b00020}
small{color:#57606a}
"""


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h}h" if d else f"{h}h{m}m" if h else f"{m}m{s}s"


def _volumes(r: dict) -> str:
    rows = []
    for v in r["volumes"]:
        disk = v["disk"]
        if disk:
            share = disk["used"] / disk["size"] if disk.get("size") else 0
            used = (f'<span class="bar"><i style="width:{share * 100:.0f}%"></i></span> '
                    f'{size(disk["used"])} ({share:.0%})')
            free, total = size(disk["free"]), size(disk["size"])
        else:
            used, free, total = "-", "-", "-"
        state = '<span class="up">up</span>' if v["up"] else '<span class="down">DOWN</span>'
        why = v["reason"] or ""
        if v["up"] and v["disk_error"]:
            why = f"disk unknown: {v['disk_error']}"
        # the reason sits under the name: on a phone the first column is the one in view
        rows.append(
            f'<tr data-volume="{escape(v["host"])}" data-state="{"up" if v["up"] else "down"}">'
            f'<td class="vol">{escape(v["host"])}<small class="why">{escape(why)}</small></td><td>{state}</td>'
            f'<td>{ms(v["latency"])}</td><td>{used}</td><td>{free}</td><td>{total}</td>'
            f'<td>{v["requests"]}</td><td>{v["errors"]}</td></tr>')
    return ('<div class="wrap"><table id="volumes"><tr><th>volume</th><th>state</th><th>latency</th>'
            '<th>disk used</th><th>free</th><th>size</th><th>requests</th><th>errors</th></tr>'
            + "".join(rows) + "</table></div>")


def _rates(r: dict) -> str:
    points = r["rates"]
    if not points:
        return "<p><small>Rates show after the first 10 seconds.</small></p>"

    def average(last: int, i: int) -> float:
        chosen = points[-last:]
        return sum(p[i] for p in chosen) / len(chosen)

    top = max(max(p[1] for p in points), 1e-9)
    bars = "".join(
        f'<i title="{time.strftime("%H:%M:%S", time.gmtime(p[0]))} UTC: {p[1]:.1f}/s, {p[3]:.1f} 5xx/s" '
        f'style="height:{max(1.0, p[1] / top * 40):.0f}px"{" class=err" if p[3] else ""}></i>'
        for p in points)
    rows = "".join(
        f"<tr><td>last {label}</td><td>{average(n, 1):.1f}/s</td><td>{average(n, 2):.2f}/s</td>"
        f"<td>{average(n, 3):.2f}/s</td></tr>"
        for label, n in (("minute", 6), (f"{len(points) * 10 / 60:g} minutes", len(points)))[:2 if len(points) > 6 else 1])
    return (f'<div class="wrap"><table id="rates"><tr><th></th><th>requests</th><th>4xx</th><th>5xx</th></tr>'
            f'{rows}</table></div><div class="spark" aria-label="requests per second, 10 s steps">{bars}</div>')


def _requests(r: dict) -> str:
    rows = "".join(f"<tr><td>{escape(m)}</td><td>{escape(s)}</td><td>{n}</td></tr>" for m, s, n in r["requests"])
    return ('<div class="wrap"><table id="requests"><tr><th>method</th><th>status</th><th>answers</th></tr>'
            + rows + "</table></div>")


def render(r: dict) -> bytes:
    server = r["server"]
    index = r["index"]
    if r["ready"]:
        banner = '<div class="banner ok" id="ready">Ready: the index takes writes and enough volumes are up.</div>'
    else:
        banner = ('<div class="banner bad" id="ready">Not ready: '
                  + "; ".join(escape(w) for w in r["not_ready"]) + "</div>")
    flags = "".join(f"<tr><td>-{escape(k)}</td><td>{escape(str(v).lower() if isinstance(v, bool) else str(v))}</td></tr>"
                    for k, v in server.get("flags", {}).items())
    oldest = index["oldest_pending_seconds"]
    index_rows = [
        ("keys", f"{index['keys']:,}"),
        ("database", f"{size(index['db_bytes'])}, {size(index['disk_free'])} free on its disk"),
        ("writable", "yes" if not index["write_error"] else f"NO: {index['write_error']}"),
        ("PENDING records", f"{index['pending']}" + (f" (oldest {oldest:.1f}s)" if oldest is not None else "")),
        ("in flight", f"PUT {r['in_flight'].get('PUT', 0)}, DELETE {r['in_flight'].get('DELETE', 0)}"),
        ("received / sent", f"{size(r['rx'])} / {size(r['tx'])}"),
        ("processes", f"{len(r['workers'])} worker(s); {size(r['process']['rss_bytes'])} resident, "
                      f"{r['process']['open_fds']:.0f} open files, {r['process']['cpu_seconds']:.1f} s CPU"),
    ]
    started = server.get("started")
    uptime = f", up {duration(r['time'] - started)}" if started else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH}">
<title>minikv {escape(str(server.get('port', '')))}</title><style>{STYLE}</style></head>
<body>
<h1>minikv index :{escape(str(server.get('port', '')))}</h1>
<small>version {escape(r['version'])}{uptime}; {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r['time']))} UTC,
refreshes every {REFRESH}s</small>
{banner}
<h2>Volumes</h2>{_volumes(r)}
<h2>Index</h2><div class="wrap"><table id="index">
{"".join(f"<tr><td>{k}</td><td>{escape(v)}</td></tr>" for k, v in index_rows)}</table></div>
<h2>Requests</h2>{_rates(r)}{_requests(r)}
<h2>Flags</h2><div class="wrap"><table id="flags">{flags}</table></div>
<p><small><a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a> · <a href="/readyz">/readyz</a>
· <a href="/status.json">/status.json</a></small></p>
</body></html>
"""
    return body.encode()
