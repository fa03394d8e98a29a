"""`/metrics`: the report in the Prometheus text format, written by prometheus_client from
families built per scrape (the counting itself is ours: see counters.py for why)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from minikv.ops.counters import BUCKETS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def families(r: dict):
    requests = CounterMetricFamily("minikv_requests", "Requests answered, by method and status.",
                                   labels=["method", "status"])
    conflicts = 0
    for method, status, n in r["requests"]:
        requests.add_metric([method, status], n)
        if status == "409":
            conflicts += n
    yield requests
    yield CounterMetricFamily("minikv_conflicts", "Writes refused with 409: another write of the key was "
                                                  "in flight.", value=conflicts)
    latency = HistogramMetricFamily("minikv_request_duration_seconds", "Time to answer a request, by method.",
                                    labels=["method"])
    for method, counts in sorted(r["hist"].items()):
        *per_bucket, total_seconds = counts
        cumulative, running = [], 0
        for bound, n in zip([*map(str, BUCKETS), "+Inf"], per_bucket):
            running += n
            cumulative.append((bound, running))
        latency.add_metric([method], cumulative, total_seconds)
    yield latency
    yield CounterMetricFamily("minikv_received_bytes", "Bytes received from clients.", value=r["rx"])
    yield CounterMetricFamily("minikv_sent_bytes", "Bytes sent to clients.", value=r["tx"])
    flying = GaugeMetricFamily("minikv_writes_in_flight", "PUTs and DELETEs being answered now.",
                               labels=["method"])
    for method in ("PUT", "DELETE"):
        flying.add_metric([method], r["in_flight"].get(method, 0))
    yield flying

    vol_requests = CounterMetricFamily("minikv_volume_requests", "Requests sent to each volume (health "
                                       "checks included).", labels=["volume"])
    vol_errors = CounterMetricFamily("minikv_volume_errors", "Failures that marked a volume down (a health "
                                     "check or a request that got no good answer).", labels=["volume"])
    up = GaugeMetricFamily("minikv_volume_up", "1 if the volume is up, 0 if the health checker marked it down.",
                           labels=["volume"])
    down = GaugeMetricFamily("minikv_volume_down_info", "1 for each volume that is down, with the reason.",
                             labels=["volume", "reason"])
    latency_v = GaugeMetricFamily("minikv_volume_probe_seconds", "Time the volume took to answer its last "
                                  "status check.", labels=["volume"])
    disk = {name: GaugeMetricFamily(f"minikv_volume_disk_{name}_bytes", f"The volume's disk: {what}.",
                                    labels=["volume"])
            for name, what in (("size", "bytes in all"), ("used", "bytes used"),
                               ("free", "bytes free to the volume server"))}
    inodes = GaugeMetricFamily("minikv_volume_disk_free_inodes", "Files the volume's disk can still create.",
                               labels=["volume"])
    for v in r["volumes"]:
        host = v["host"]
        vol_requests.add_metric([host], v["requests"])
        vol_errors.add_metric([host], v["errors"])
        up.add_metric([host], 1 if v["up"] else 0)
        if not v["up"]:
            down.add_metric([host, v["reason"] or "unknown"], 1)
        if v["latency"] is not None:
            latency_v.add_metric([host], v["latency"])
        if v["disk"]:
            for name, family in disk.items():
                family.add_metric([host], v["disk"].get(name, 0))
            inodes.add_metric([host], v["disk"].get("inodes_free", 0))
    yield from (vol_requests, vol_errors, up, down, latency_v, *disk.values(), inodes)

    index = r["index"]
    yield GaugeMetricFamily("minikv_index_keys", "Records in the index (live, unlinked and pending).",
                            value=index["keys"])
    yield GaugeMetricFamily("minikv_index_database_bytes", "Size of the index database file.",
                            value=index["db_bytes"])
    if index["disk_free"] is not None:
        yield GaugeMetricFamily("minikv_index_disk_free_bytes", "Bytes free on the disk holding the index.",
                                value=index["disk_free"])
    yield GaugeMetricFamily("minikv_index_pending_records", "Keys whose write or delete is in flight (PENDING).",
                            value=index["pending"])
    if index["oldest_pending_seconds"] is not None:
        yield GaugeMetricFamily("minikv_index_oldest_pending_seconds", "Age of the oldest PENDING record: "
                                "one that keeps growing is a stuck write.", value=index["oldest_pending_seconds"])
    yield GaugeMetricFamily("minikv_index_writable", "1 if the index database takes writes.",
                            value=0 if index["write_error"] else 1)
    yield GaugeMetricFamily("minikv_ready", "1 if /readyz answers 200.", value=1 if r["ready"] else 0)

    p = r["process"]
    yield CounterMetricFamily("minikv_process_cpu_seconds", "CPU time of the server's processes (supervisor "
                              "and live workers), summed.", value=p["cpu_seconds"])
    yield GaugeMetricFamily("minikv_process_resident_memory_bytes", "Resident memory of the server's "
                            "processes, summed.", value=p["rss_bytes"])
    yield GaugeMetricFamily("minikv_process_open_fds", "Open files of the server's processes, summed.",
                            value=p["open_fds"])
    yield GaugeMetricFamily("minikv_workers", "Worker processes serving.", value=len(r["workers"]))
    info = GaugeMetricFamily("minikv_build_info", "The minikv version.", labels=["version"])
    info.add_metric([r["version"]], 1)
    yield info


class _Collector:
    def __init__(self, report: dict):
        self.r = report

    def collect(self):
        return families(self.r)


def render(report: dict) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(report))
    return generate_latest(registry)
