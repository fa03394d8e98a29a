"""The operations listener (-metrics-port) of a server whose index is in PostgreSQL: /metrics,
/healthz, /readyz, the page and `minikv status`, with the index's figures asked of the database
(an estimate of the keys, the PENDING records through their index), and not ready while the
database cannot be written. Real PostgreSQL, real nginx volumes, real index processes."""

from __future__ import annotations

import time

import pytest
import requests
from test_faults import fresh, start_upload
from test_ops import ops_cluster, requests_total, samples, status_cmd, wait_for

from minikv.ops.pg_facts import estimate_keys


@pytest.fixture(scope="module")
def engine() -> str:
    """This module's clusters keep their index in the test run's PostgreSQL (conftest.py)."""
    return "postgresql"


def test_metrics_page_and_status_of_a_postgresql_index(make_cluster):
    c = ops_cluster(make_cluster, workers=2)
    for i in range(30):
        assert requests.put(c.url(f"/m{i}"), data=b"v" * 10, timeout=10).status_code == 201
    for i in range(5):
        assert requests.delete(c.url(f"/m{i}"), timeout=10).status_code == 204
    for i in range(5, 15):
        assert requests.get(c.url(f"/m{i}"), allow_redirects=False, timeout=10).status_code == 302
    assert requests.get(c.url("/nothing"), allow_redirects=False, timeout=10).status_code == 404
    want = {("PUT", "201"): 30, ("DELETE", "204"): 5, ("GET", "302"): 10, ("GET", "404"): 1}
    wait_for(lambda: requests_total(samples(c)) == want, what=f"request counts {want}")
    m = wait_for(lambda: (m := samples(c))[("minikv_index_keys", ())] == 25 and m, what="25 keys (counted: small)")
    assert m[("minikv_index_pending_records", ())] == 0
    assert m[("minikv_index_writable", ())] == 1
    assert m[("minikv_ready", ())] == 1
    assert m[("minikv_index_database_bytes", ())] > 0
    assert ("minikv_index_disk_free_bytes", ()) not in m  # the database's disk is not ours to see
    assert requests.get(c.ops + "/healthz", timeout=10).text == "ok\n"
    assert requests.get(c.ops + "/readyz", timeout=10).status_code == 200
    page = requests.get(c.ops + "/", timeout=10).text
    assert "25" in page and "writable" in page
    out = status_cmd(c.ops_address)
    assert out.returncode == 0 and "25 keys" in out.stdout and "writable" in out.stdout, out


def test_a_write_in_flight_is_a_pending_record_with_its_age(make_cluster):
    c = ops_cluster(make_cluster, workers=1)
    s = start_upload(c.port, fresh(), 1000, b"x" * 10)  # the key is locked until the body ends
    try:
        m = wait_for(lambda: (m := samples(c))[("minikv_index_pending_records", ())] == 1 and m,
                     what="one PENDING record")
        time.sleep(1.2)  # past the figures' reuse: asked again
        m = samples(c)
        assert m[("minikv_index_oldest_pending_seconds", ())] >= 1.0
        assert m[("minikv_writes_in_flight", (("method", "PUT"),))] == 1
    finally:
        s.close()
    wait_for(lambda: samples(c)[("minikv_index_pending_records", ())] == 0, what="the lock released")


def test_readyz_says_not_ready_while_the_database_cannot_be_written(make_cluster, postgres):
    # an instance of this test's own: stopping the shared one would fail the other tests
    from pg import Postgres

    pg = Postgres().init().start()
    try:
        c = ops_cluster(make_cluster, workers=2, db=pg.create_db("t1"))
        wait_for(lambda: requests.get(c.ops + "/readyz", timeout=10).status_code == 200, what="ready")
        pg.stop()
        start = time.monotonic()
        r = wait_for(lambda: (r := requests.get(c.ops + "/readyz", timeout=10)).status_code == 503 and r.text,
                     what="readyz 503 with the database down")
        assert time.monotonic() - start < 8
        assert "index database" in r, r
        # each worker asks at most once a second: the other one may still hold a second-old answer
        wait_for(lambda: samples(c)[("minikv_index_writable", ())] == 0, what="not writable in /metrics")
        assert requests.get(c.ops + "/healthz", timeout=10).status_code == 200  # alive: do not restart it
        time.sleep(1.1)
        out = status_cmd(c.ops_address)
        assert out.returncode == 1 and "NOT WRITABLE" in out.stdout, out
        pg.start()
        wait_for(lambda: requests.get(c.ops + "/readyz", timeout=10).status_code == 200, 20, "ready again")
    finally:
        pg.remove()


def test_a_read_only_database_is_not_ready(make_cluster, postgres):
    """A standby (or a database set read-only) answers reads but takes no write: not ready."""
    c = ops_cluster(make_cluster, workers=1)
    name = c.db.rsplit("/", 1)[1]
    wait_for(lambda: requests.get(c.ops + "/readyz", timeout=10).status_code == 200, what="ready")
    postgres.psql("postgres", f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    # sessions take the setting when they open: close the server's so that they reopen
    postgres.psql("postgres", f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    try:
        r = wait_for(lambda: (r := requests.get(c.ops + "/readyz", timeout=10)).status_code == 503 and r.text,
                     what="readyz 503 on a read-only database")
        assert "read-only" in r, r
    finally:
        postgres.psql("postgres", f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        postgres.psql("postgres", f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    wait_for(lambda: requests.get(c.ops + "/readyz", timeout=10).status_code == 200, 20, "ready again")


def test_estimate_keys_scales_the_last_count_to_the_table_now():
    assert estimate_keys(-1, 0, 5, 42) == 42  # never analysed: the live-tuple count
    assert estimate_keys(0, 0, 0, 0) == 0
    assert estimate_keys(1000, 10, 20, 7) == 2000  # twice the pages: about twice the rows
    assert estimate_keys(1000, 10, 10, -3) == 1000
