"""The PostgreSQL index's write path, for thrash: the default number of index workers (half the
cores when the database is on this host, whose backends do part of each request's work on the
same cores; one per core when it is elsewhere, as for LMDB; -workers always wins), and the plan
of the group commit's statement on a new index."""

from __future__ import annotations

import os

import pytest

from minikv.cli import parse_args
from minikv.config import Config

LOCAL = [
    "postgresql://minikv@/postgres?host=/srv/minikv/postgres&port=5432",  # what `up -postgres` runs
    "postgresql:///minikv",  # libpq's default: the unix socket
    "postgresql://minikv@localhost/minikv",
    "postgresql://minikv@127.0.0.1:5432/minikv",
    "postgresql://minikv@[::1]:5432/minikv",
    "postgresql://minikv@%2Fvar%2Frun%2Fpostgresql/minikv",
    "postgres://minikv@localhost:5432,127.0.0.1:5433/minikv",
]
REMOTE = [
    "postgresql://minikv@db1/minikv",
    "postgresql://minikv:secret@10.0.0.7:5432/minikv",
    "postgresql://minikv@localhost:5432,db2:5432/minikv?target_session_attrs=read-write",  # one host is not ours
    "postgresql://minikv@/minikv?host=db1",
]


def workers(db: str, *more: str) -> int:
    args = parse_args(["server", "-volumes", "127.0.0.1:1", "-db", db, *more])
    return Config.from_args(args).workers


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("PGHOST", raising=False)


@pytest.mark.parametrize("db", LOCAL)
def test_a_database_on_this_host_leaves_it_half_the_cores(four_cores, db):
    assert workers(db) == 2


@pytest.mark.parametrize("db", REMOTE)
def test_a_database_elsewhere_leaves_one_worker_per_core(four_cores, db):
    assert workers(db) == 4


def test_lmdb_and_the_flag_are_unchanged(four_cores, tmp_path):
    assert workers(str(tmp_path / "index")) == 4
    assert workers(LOCAL[0], "-workers", "3") == 3


def test_pghost_names_the_host_when_the_url_does_not(four_cores, monkeypatch):
    monkeypatch.setenv("PGHOST", "db1")
    assert workers("postgresql:///minikv") == 4
    monkeypatch.setenv("PGHOST", "/run/postgresql")
    assert workers("postgresql:///minikv") == 2


def test_one_core_keeps_one_worker(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert workers(LOCAL[0]) == 1


def test_the_group_commit_never_scans_the_whole_table_in_a_new_index(postgres):
    """The plan a connection keeps for the group commit's statement (index/pg_write.py) is made
    on its first uses, when a new index's table is empty: it must still find each change's row
    by the primary key. It joined the changes to a sequential scan of the table (dead rows too),
    which every group then paid, more as the table grew, until the next ANALYZE."""
    from minikv.index.pg_write import GROUP_CAS

    found = postgres.generic_plan_scans(GROUP_CAS, "bytea[], bytea[], bytea[], text[], text[]")
    assert found and "Seq Scan" not in found, found


def test_the_admin_commands_batch_update_never_scans_the_whole_table_in_a_new_index(postgres):
    """The same for the batch update of records that rebuild (into an index it filled moments
    ago) and the other admin commands hold locked: a row found by the primary key, never by a
    sequential scan that grows with the index in every batch."""
    from minikv.index.pg_sync import SET_RECORDS

    found = postgres.generic_plan_scans(SET_RECORDS, "bytea[], bytea[]")
    assert found and "Seq Scan" not in found, found
