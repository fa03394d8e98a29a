"""The pure parts, pinned by fixed outputs: placement (minikeyvalue's on-disk contract),
record encoding and its state table, flag parsing."""

import pytest

from minikv.cli import UsageError, go_duration, parse_args, parse_duration, usage
from minikv.index import record
from minikv.placement import key2path, key2volume, name_too_long, needs_rebalance, path2key


# ensure the volume hashing function doesn't change: existing clusters depend on it
def test_key2path_vectors():
    assert key2path(b"hello") == "/5d/41/aGVsbG8="
    assert key2path(b"helloworld") == "/fc/5e/aGVsbG93b3JsZA=="


def test_key2volume_vectors():
    vols = ["larry", "moe", "curly"]
    got = {k: key2volume(k.encode(), vols, 1, 3)[0].split("/")[0] for k in ("hello", "helloworld", "world", "blah")}
    assert got == {"hello": "larry", "helloworld": "curly", "world": "moe", "blah": "curly"}


def test_key2volume_subvolume_suffix_and_replicas():
    assert key2volume(b"hello", ["larry", "moe", "curly"], 1, 3) == ["larry/sv00"]
    three = key2volume(b"hello", ["larry", "moe", "curly"], 3, 1)
    assert sorted(three) == ["curly", "larry", "moe"] and three[0] == "larry"
    assert all("/sv" in v for v in key2volume(b"/k", ["a:1", "b:2", "c:3"], 3, 10))


def test_path2key_round_trip_and_rejects():
    for key in (b"/wehave", b"/with space", "/ünï".encode(), b"/" + bytes(range(1, 200))):
        assert path2key(key2path(key)) == key
    assert path2key("/00/00/aGVsbG8=") is None  # md5 folders do not match
    assert path2key("/5d/41/not base64!") is None
    assert path2key("body_temp/0000001") is None


def test_needs_rebalance_is_order_sensitive():
    assert not needs_rebalance(["a", "b"], ["a", "b"])
    assert needs_rebalance(["b", "a"], ["a", "b"])
    assert needs_rebalance(["a"], ["a", "b"])


def test_name_too_long():
    assert name_too_long(b"/" + b"k" * 180) == 0
    assert name_too_long(b"/" + b"k" * 300) > 255


def test_record_round_trip():
    raw = record.encode_data(record.LIVE, ["a:1/sv01", "b:2/sv0A"], 12345, 1700000000123, bytes(range(16)))
    d = record.decode_data(raw)
    assert d == (record.LIVE, ["a:1/sv01", "b:2/sv0A"], 12345, 1700000000123, bytes(range(16)), 0)
    assert d.md5_hex == bytes(range(16)).hex()
    assert record.decode_data(record.with_state(raw, record.UNLINKED)).state == record.UNLINKED
    p = record.encode_pending(record.OP_REBALANCE, 4242, 99, ["x:1"], raw)
    assert record.decode_pending(p) == (record.OP_REBALANCE, 4242, 99, ["x:1"], raw, None)
    # an S3 write's lock names its value (size, md5, mtime) after the volumes, for recovery
    p = record.encode_pending(record.OP_PUT, 4242, 99, ["x:1", "y:2/sv03"], raw, (7, bytes(range(16)), 1234))
    assert record.decode_pending(p) == (record.OP_PUT, 4242, 99, ["x:1", "y:2/sv03"], raw, (7, bytes(range(16)), 1234))
    assert record.decode_pending(record.encode_pending(record.OP_PUT, 1, 2, [])).volumes == []
    # a damaged fingerprint is not known (as an older minikv's lock): readers still get the
    # record it keeps, where a ValueError failed every read of the key
    for mark in (b"7:zz:1234", b"7:00", b"x:00:1", b"7:0:1:9"):
        damaged = p.replace(b";7:" + bytes(range(16)).hex().encode() + b":1234", b";" + mark)
        assert damaged != p and record.decode_pending(damaged).new is None
        assert record.readable(damaged) == raw


def test_record_layout_is_pinned():
    raw = record.encode_data(record.LIVE, ["v:1"], 1, 2, b"\x01" * 16, 7)
    assert raw == (b"L" + (1).to_bytes(8, "little") + (2).to_bytes(8, "little") + b"\x01" * 16
                   + (7).to_bytes(4, "little") + b"v:1")


@pytest.mark.parametrize("before,after,ok", [
    (None, "P", True), (None, "L", False), ("P", "L", True), ("P", None, True), ("P", "U", True),
    ("L", "U", True), ("L", "P", True), ("L", None, False), ("U", "P", True), ("U", "L", False),
])
def test_transition_table(before, after, ok):
    enc = {"L": record.encode_data(record.LIVE, ["v"], 1, 1, b""),
           "U": record.encode_data(record.UNLINKED, ["v"], 1, 1, b""),
           "P": record.encode_pending(record.OP_PUT, 1, 1, ["v"]), None: None}
    if ok:
        record.check_transition(enc[before], enc[after])
    else:
        with pytest.raises(record.IllegalTransition):
            record.check_transition(enc[before], enc[after])


def test_a_lock_may_change_hands_but_not_what_it_locks():
    lock = record.encode_pending(record.OP_REBALANCE, 1, 1, ["v"], record.encode_data(record.LIVE, ["w"], 1, 1, b""))
    record.check_transition(lock, record.reowned(lock, 2, 5))  # recovery claims it
    assert record.decode_pending(record.reowned(lock, 2, 5))[1:] == (2, 5, ["v"], record.decode_pending(lock).previous, None)
    for other in (record.encode_pending(record.OP_REBALANCE, 2, 5, ["x"], record.decode_pending(lock).previous),
                  record.encode_pending(record.OP_PUT, 2, 5, ["v"], record.decode_pending(lock).previous)):
        with pytest.raises(record.IllegalTransition):
            record.check_transition(lock, other)


def test_go_style_flags_anywhere():
    a = parse_args(["-volumes", "a:1,b:2", "-db", "/tmp/idx", "server", "-protect", "--replicas=2",
                    "-md5sum=false", "-voltimeout", "500ms"])
    assert a.command == "server"
    assert a.volume_list == ["a:1", "b:2"]
    assert (a.protect, a.replicas, a.md5sum, a.voltimeout) == (True, 2, False, 0.5)
    assert parse_args(["server", "-port", "3005"]).port == 3005


def test_bad_flags():
    with pytest.raises(UsageError):
        parse_args(["-nope"])
    with pytest.raises(UsageError):
        parse_args(["-port"])
    with pytest.raises(UsageError):
        parse_args(["-port", "abc"])


def test_durations():
    assert parse_duration("1s") == 1.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2") == 2.0
    with pytest.raises(ValueError):
        parse_duration("1x")


def test_usage_shows_flags_as_go_does():
    assert [go_duration(s) for s in (0.5, 1, 60, 75, 3600)] == ["500ms", "1s", "1m0s", "1m15s", "1h0m0s"]
    text = usage()
    # zero values show no default; strings are quoted; durations are Go's
    assert "  -db string\n        path to the index database (a directory)\n" in text
    assert "  -port int\n        port to listen on (volume: 3001 or $PORT) (default 3000)\n" in text
    assert "  -md5sum\n        compute and store the md5 of every value (default true)\n" in text
    assert "  -protect\n        refuse DELETE unless the key was UNLINKed first\n" in text
    assert "(default 1s)" in text and '(default "data")' in text and "(default False)" not in text


def test_connection_budget_keeps_files_for_the_volumes():
    from minikv.server import connection_budget

    assert connection_budget(10000, 1 << 20) == 10000  # the flag rules when files are plenty
    assert connection_budget(10000, 1024) == 768  # a quarter stays for volume connections
    assert connection_budget(10000, 256) == 192
    assert connection_budget(10000, 128) == 64  # at least 64 stay, more than a quarter here
    assert connection_budget(0, 1024) == 768  # -max-connections 0: only the files limit
    assert connection_budget(100, 1024) == 100


def test_config_refuses_what_would_store_fewer_copies_than_asked():
    from minikv.config import Config

    Config(volumes=["a:1", "b:2", "c:3"], db="x").check()
    with pytest.raises(ValueError, match="-volumes names a:1 twice"):
        Config(volumes=["a:1", "b:2", "a:1"], db="x").check()
    with pytest.raises(ValueError, match="-replicas 3 needs at least 3 volumes"):
        Config(volumes=["a:1", "b:2"], db="x").check()
    with pytest.raises(ValueError, match="is not host:port"):
        Config(volumes=["a:1", "b"], db="x", replicas=1).check()


def test_processes_one_for_a_small_index_else_default_and_workers_when_given():
    from types import SimpleNamespace

    from minikv.admin.parts import DEFAULT_PROCS, SMALL, processes

    plain = parse_args(["rebalance"])
    told = parse_args(["rebalance", "-workers", "3"])
    assert "workers" not in plain.given and "workers" in told.given
    cores = SimpleNamespace(workers=8)  # Config.workers when -workers is not given: the cores
    # not given: one process up to SMALL records (starting others costs more than they save)
    assert [processes(plain, cores, n) for n in (0, 1, SMALL)] == [1, 1, 1]
    assert processes(plain, cores, SMALL + 1) == processes(plain, cores, 10**9) == DEFAULT_PROCS
    # given: -workers wins both ways
    assert processes(told, SimpleNamespace(workers=3), 0) == 3
    assert processes(told, SimpleNamespace(workers=1), SMALL + 1) == 1
    # from 1 to `most`
    assert processes(told, SimpleNamespace(workers=100), 0, most=64) == 64
    assert processes(told, SimpleNamespace(workers=-1), SMALL + 1) == 1
    assert processes(plain, cores, SMALL + 1, most=1) == 1


# The status page (no login) showed -db with its PostgreSQL password, and the path of
# -s3-secret-key-file; a password given as libpq's `password=` parameter was neither redacted
# nor warned about.
def test_the_status_page_flags_and_messages_never_show_a_database_password():
    from types import SimpleNamespace

    from minikv.cli import FLAGS
    from minikv.index.pg import describe, password_warning
    from minikv.ops import shown_flags

    for url in ("postgresql://minikv:hunter2@/postgres?host=/run/pg&port=5432",
                "postgresql://minikv@/postgres?host=/run/pg&password=hunter2",
                "postgresql://minikv@/postgres?password=hunter2&host=/run/pg",
                "postgresql://minikv@/postgres?host=/run/pg&pass%77ord=hunter2",  # the driver decodes names
                "postgresql://minikv@/postgres?host=/run/pg&sslpassword=hunter2&sslkey=/k"):
        assert "hunter2" not in describe(url) and "***" in describe(url) and password_warning(url)
        flags = {name: None for name in FLAGS}
        flags.update({"db": url, "s3-secret-key-file": "/etc/minikv/s3-key", "uploads-older-than": 60.0})
        shown = shown_flags(SimpleNamespace(flags=flags))
        assert "hunter2" not in str(shown) and shown["s3-secret-key-file"] == "(set)"
        assert "uploads-older-than" not in shown  # gc's, not the server's
    assert describe("postgresql://minikv@/postgres?host=/run/pg") == "postgresql://minikv@/postgres?host=/run/pg"
    assert not password_warning("postgresql://minikv@/postgres?host=/run/pg")
    # credentials from the environment (as `up` passes them) are shown set: the server uses them
    from minikv.config import Config

    flags = {name: None for name in FLAGS}
    used = Config(volumes=["v:1"], db="idx", secret="hunter2", s3_access_key="AKID", s3_secret_key="hunter3")
    shown = shown_flags(SimpleNamespace(flags=flags), used)
    assert [shown[n] for n in ("secret", "s3-access-key", "s3-secret-key")] == ["(set)"] * 3
    assert "hunter" not in str(shown)


# /healthz waited for the index's refresh (3 s when PostgreSQL hangs), and 32 connections that
# sent nothing made it answer 503: a liveness probe failed on a healthy server either way.
def test_healthz_answers_at_once_past_idle_connections_and_a_stalled_index():
    import asyncio
    import time

    from minikv.ops.listener import MAX_CLIENTS, Listener

    class StalledIndex:
        async def refresh(self):
            await asyncio.sleep(3)

        def readiness(self):
            return []

    async def main() -> tuple[bytes, float]:
        server = await asyncio.start_server(Listener(StalledIndex()).client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CLIENTS + 8)]
        await asyncio.sleep(0.1)
        start = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        got = await asyncio.wait_for(reader.read(), 2)
        took = time.monotonic() - start
        for _, w in idle + [(reader, writer)]:
            w.close()
        server.close()
        return got, took

    got, took = asyncio.run(main())
    assert got.startswith(b"HTTP/1.1 200 ") and took < 1, (got[:60], took)


# Every worker of a server renews its one lease row: when the lease was lost and one worker
# claimed it again, the others' renewals succeeded on the new row and they never knew, so
# their writes locked before the loss could commit. The token claimed again differs.
def test_a_lease_claimed_again_by_another_worker_is_a_loss_for_every_worker(monkeypatch):
    import time

    from minikv.index import fence

    monkeypatch.setattr(fence, "_token", None)
    monkeypatch.setattr(fence, "_renewed_at", None)
    fence.renewed(time.monotonic(), "abc")
    since = fence.epoch()
    fence.renewed(time.monotonic(), "abc")
    assert fence.epoch() == since and not fence.suspect(since)
    fence.renewed(time.monotonic(), "abc#1234")  # another worker claimed it again meanwhile
    assert fence.epoch() != since and fence.suspect(since)


def test_flags_a_volume_or_the_server_does_not_read_are_named():
    # `minikv volume -max-value-size 10 -protect DIR` started without a word, and wrote any size
    from minikv.cli import parse_args, unused_flags

    assert unused_flags(parse_args(["volume", "-protect", "-max-value-size", "10", "-port", "1", "-secret",
                                    "x" * 16, "d"])) == ["max-value-size", "protect"]
    assert unused_flags(parse_args(["server", "-data", "x", "-concurrency", "3", "-volumes", "a:1", "-db", "i",
                                    "-protect"])) == ["concurrency", "data"]
    assert unused_flags(parse_args(["rebuild", "-concurrency", "3"])) == []


def test_status_of_something_that_is_not_a_minikv_status_is_a_message(monkeypatch, capsys):
    # an answer in the status's place that is JSON of another shape gave a traceback
    from minikv.cli import parse_args
    from minikv.ops import status

    for report in ({}, [], {"index": 1}, {"version": "x", "index": {}, "in_flight": {}}):
        monkeypatch.setattr(status, "find", lambda server, r=report: ("h:1", r))
        assert status.main(parse_args(["status", "-server", "h:1"])) == 2
        assert "cannot read" in capsys.readouterr().err


def test_what_a_failed_put_over_an_unlinked_value_leaves():
    from minikv.index.recovery import unlinked_after

    old = record.encode_data(record.UNLINKED, ["a:1", "b:2"], 18, 5, bytes(16), 77)
    # nothing replaced: every copy stays, the record as it was; the PUT's other volume is cleaned
    assert unlinked_after(old, ["a:1", "c:3"], []) == (["c:3"], old)
    # one replaced: the other stays, its record names it alone (off its layout: epoch 0)
    delete, kept = unlinked_after(old, ["a:1", "b:2"], ["a:1"])
    assert delete == ["a:1"] and record.decode_data(kept) == (record.UNLINKED, ["b:2"], 18, 5, bytes(16), 0)
    # every copy replaced: nothing of it is left, the record goes
    assert unlinked_after(old, ["a:1", "b:2"], ["a:1", "b:2"]) == (["a:1", "b:2"], None)

