"""Everything the operations listener shows, gathered in one dict: `/metrics`, the page,
`/readyz` and `/status.json` (what `minikv status` reads) are each a view of it."""

from __future__ import annotations

import os
import time

from minikv.ops import facts
from minikv.ops.publish import gather, rates, read_json
from minikv.ops.volumes import VOLUMES_FILE

STALE_AFTER = 10.0  # seconds: disk figures older than this are shown as such


def by_method(answers: dict) -> dict[str, list]:
    """Latency buckets and seconds per method (the statuses added up)."""
    out: dict[str, list] = {}
    for (method, _), entry in answers.items():
        have = out.get(method)
        out[method] = list(entry) if have is None else [a + b for a, b in zip(have, entry)]
    return out


class Reporter:
    """Made in each worker: reads the shared folder and asks this worker's health and store."""

    def __init__(self, app, folder: str):
        self.app = app
        self.folder = folder
        self.write_check = facts.WriteCheck(app.store)

    def index_facts(self) -> dict:
        return facts.index_facts(self.app.store)

    def readiness(self) -> list[str]:
        """Why this server should get no traffic now ([]: ready)."""
        why = []
        if (reason := self.write_check()) is not None:
            why.append(reason)
        health = self.app.health
        up = [h for h in health.hosts if h not in health.down]
        replicas = self.app.config.replicas
        if len(up) < replicas:
            down = "; ".join(health.reasons.get(h, f"volume {h} is down") for h in health.hosts if h in health.down)
            why.append(f"{len(up)} of {len(health.hosts)} volumes are up, writes need {replicas} (-replicas): {down}")
        return why

    def report(self) -> dict:
        now = time.time()
        server = read_json(self.folder, "server.json") or {}
        total = gather(self.folder)
        known = read_json(self.folder, VOLUMES_FILE) or {}
        seen = known.get("volumes", {})
        health = self.app.health
        volumes = []
        for host in health.hosts:
            info = seen.get(host) or {}
            disk = info.get("disk")
            volumes.append({
                "host": host,
                "up": host not in health.down,
                "reason": health.reasons.get(host) if host in health.down else None,
                "latency": info.get("latency"),
                "disk": disk,
                "disk_age": None if not disk else max(0.0, now - disk.get("time", now)),
                "disk_error": info.get("error"),
                "requests": total["volume_requests"].get(host, 0),
                "errors": total["volume_errors"].get(host, 0),
            })
        index = self.index_facts()
        index["write_error"] = self.write_check()
        pids = [p for p in (server.get("pid"),) if p and p != os.getpid() and p not in total["workers"]]
        not_ready = self.readiness()
        return {
            "version": server.get("version", ""),
            "server": server,
            "time": now,
            "ready": not not_ready,
            "not_ready": not_ready,
            "index": index,
            "in_flight": total["in_flight"],
            "requests": [[m, s, sum(e[:-1])] for (m, s), e in sorted(total["answers"].items())],
            "hist": by_method(total["answers"]),
            "rx": total["rx"],
            "tx": total["tx"],
            "rates": rates(total["history"]),
            "volumes": volumes,
            "workers": {str(pid): n for pid, n in total["workers"].items()},
            "process": facts.process_facts([*pids, *total["workers"]]),
        }
