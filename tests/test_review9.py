"""Review of verify's notes (admin/seen.py: the walk notes each key's listed copies, pass 2 reads
them beside the index in key order): each test here failed on the code reviewed, against real
nginx volumes and a real index."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_review7 import written  # noqa: E402

from minikv.admin import verify  # noqa: E402
from minikv.admin.orphans import Orphans  # noqa: E402
from minikv.cli import parse_args  # noqa: E402
from minikv.placement import key2path  # noqa: E402

ENGINES = ["lmdb", "postgresql"]  # pass 2 reads the index in key order beside the notes: both engines


def files_without_records(c, n: int, prefix: bytes) -> None:
    """`n` files on the first volume that no record names, as a lost index leaves them."""
    top = c.volume_dir(c.names[0])
    for i in range(n):
        path = top / key2path(prefix + b"%06d" % i)[1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"o")


def test_the_orphans_between_two_records_go_to_the_orphan_search_a_batch_at_a_time(make_cluster, monkeypatch, capsys):
    # every noted key before a record was gathered in one list, then one dict of decoded copies,
    # then searched in one call that looks at no Ctrl-C: memory grew with the orphans between two
    # records (an index restored from an old backup: most of the volumes' keys), and a first
    # Ctrl-C waited for a HEAD of every one of them
    c = written(make_cluster, {"/a": b"the first key", "/zzzz": b"the last key"}, volumes=1, replicas=1,
                subvolumes=1)
    n = verify.ORPHAN_BATCH * 2 + 100
    files_without_records(c, n, b"/o/")  # all between the two records in key order
    handed: list[int] = []
    search = Orphans.handle

    async def handle(self, group):
        handed.append(len(group))
        await search(self, group)

    monkeypatch.setattr(Orphans, "handle", handle)
    for walk in ([], [str(c.volume_dir(c.names[0]))]):
        handed.clear()
        args = parse_args(["verify", "-volumes", c.names[0], "-db", c.db, "-replicas", "1",
                           "-subvolumes", "1", "-workers", "1", *walk])
        assert verify.main(args) == 1
        err = capsys.readouterr().err
        assert "2 keys seen, 2 ok" in err and f"{n} orphan files" in err, err
        assert sum(handed) == n and max(handed) <= verify.ORPHAN_BATCH, handed


def test_a_key_with_control_characters_cannot_forge_an_admin_commands_lines():
    # problem lines printed keys as they are: a key holding a newline (a client PUTs it as %0A)
    # wrote a line of its own, one holding ESC or U+009B drove the operator's terminal
    from minikv.admin.common import show

    shown = show(b"/k\nverify: 0 lost\r\x1b[2J\xc2\x9b2J\x7f\x00/\xff/\xc3\xa9")
    assert shown == "/k\\x0averify: 0 lost\\x0d\\x1b[2J\\u009b2J\\x7f\\x00/\\xff/é"
    assert shown.isprintable()
