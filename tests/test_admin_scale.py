"""The admin commands at scale: rebuild from local volume folders (scandir) and from HTTP in
several processes, with large write batches; verify from the volumes' listings. Real volumes,
real index processes; the figures themselves are in bench/admin.py, not here."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import admin, key_with_slash, put_direct, ready, restart, write  # noqa: E402

from minikv.admin.local import volume_dirs  # noqa: E402
from minikv.index.record import decode_data  # noqa: E402
from minikv.index.store import Store  # noqa: E402
from minikv.placement import key2volume  # noqa: E402


def records(db: Path) -> dict[bytes, list[str]]:
    store = Store(str(db), readonly=True)
    try:
        pairs, _ = store.scan(b"")
        return {k: decode_data(v).volumes for k, v in pairs}
    finally:
        store.close()


def test_local_rebuild_reads_the_volume_folders_and_matches_the_http_one(make_cluster):
    c = make_cluster(volumes=3, replicas=2)
    keys = {f"/loc/{i}": os.urandom(5 + i % 7) for i in range(60)}
    keys[key_with_slash()] = b"nested"
    write(c, keys)
    before = {k: c.get(quote(k), allow_redirects=False).headers["Key-Volumes"] for k in keys}
    go_key = "/go/only-files"  # files and no record, as the Go original leaves them
    go_volumes = key2volume(go_key.encode(), c.names, 2, c.subvolumes)
    for volume in go_volumes:
        put_direct(volume, go_key, b"go")
    keys[go_key] = b"go"
    before[go_key] = ",".join(go_volumes)
    ready(c)
    c.index.stop()
    for v in c.volumes:  # the local mode needs no volume server: it reads the disks
        v.stop()

    dirs = [str(c.volume_dir(n)) for n in c.names]
    local = c.root / "local"
    r = admin("rebuild", c, "-workers", "2", "-md5", *dirs, db=local)  # md5s read from the files
    assert r.returncode == 0, r.stderr
    assert f"{len(keys)} keys found" in r.stderr and "from their local folders" in r.stderr, r.stderr

    for v in c.volumes:
        v.start()
    over_http = c.root / "http"
    r = admin("rebuild", c, "-workers", "3", db=over_http)
    assert r.returncode == 0, r.stderr
    assert records(local) == records(over_http)  # the same volumes (the HTTP one has no md5s)

    restart(c, db=local)
    for key, value in keys.items():
        assert c.get(quote(key)).content == value, key
        head = c.get(quote(key), allow_redirects=False).headers
        assert head["Key-Volumes"] == before[key], key
        assert head["Content-Md5"] == hashlib.md5(value).hexdigest(), key


def test_local_rebuild_one_volume_host_at_a_time_adds_up(make_cluster):
    c = make_cluster(volumes=3, replicas=3)
    keys = {f"/host/{i}": f"value {i}".encode() for i in range(30)}
    write(c, keys)
    ready(c)
    c.index.stop()
    whole = c.root / "whole"
    assert admin("rebuild", c, *[str(c.volume_dir(n)) for n in c.names], db=whole).returncode == 0

    merged = c.root / "merged"
    first = admin("rebuild", c, f"{c.names[0]}={c.volume_dir(c.names[0])}", db=merged)
    assert first.returncode == 0, first.stderr
    assert {v.split("/")[0] for vols in records(merged).values() for v in vols} == {c.names[0]}
    refused = admin("rebuild", c, f"{c.names[1]}={c.volume_dir(c.names[1])}", db=merged)
    assert refused.returncode == 2 and "-force" in refused.stderr
    for name in c.names[1:]:
        r = admin("rebuild", c, "-force", f"{name}={c.volume_dir(name)}", db=merged)
        assert r.returncode == 0, r.stderr
    assert records(merged) == records(whole)


def test_local_rebuild_tells_what_is_wrong_with_its_folders(make_cluster, tmp_path):
    c = make_cluster(volumes=2, replicas=1)
    r = admin("rebuild", c, str(c.volume_dir(c.names[0])), db=tmp_path / "x")
    assert r.returncode == 2 and "2 volumes" in r.stderr
    r = admin("rebuild", c, f"127.0.0.9:1={c.volume_dir(c.names[0])}", db=tmp_path / "x")
    assert r.returncode == 2 and "not one of -volumes" in r.stderr
    r = admin("rebuild", c, f"{c.names[0]}={tmp_path / 'nope'}", db=tmp_path / "x")
    assert r.returncode == 2 and "is not a folder" in r.stderr
    assert not (tmp_path / "x").exists()


def test_volume_dirs_maps_folders_to_volumes(tmp_path):
    vols = ["a:1", "b:2"]
    assert volume_dirs(vols, []) == {}
    assert volume_dirs(vols, [str(tmp_path), str(tmp_path)]) == {"a:1": str(tmp_path), "b:2": str(tmp_path)}
    assert volume_dirs(vols, [f"b:2={tmp_path}"]) == {"b:2": str(tmp_path)}
    for bad in ([f"b:2={tmp_path}", str(tmp_path)], [f"b:2={tmp_path}", f"b:2={tmp_path}"]):
        try:
            volume_dirs(vols, bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} was taken")


def test_verify_takes_as_right_only_records_whose_every_copy_is_listed_with_its_size(tmp_path):
    from minikv.admin.progress import Progress
    from minikv.admin.seen import Notes
    from minikv.admin.verify import Verify
    from minikv.admin.walk import Found
    from minikv.config import Config
    from minikv.index.record import LIVE, NO_MD5, PENDING, UNLINKED, encode_data

    store = Store(str(tmp_path / "index"))
    a, b = "v:1/sv00", "v:2/sv01"
    recs = {b"/extra": encode_data(LIVE, [a, b], 5, 1, NO_MD5, 0),
            b"/missing": encode_data(LIVE, [a, b], 5, 1, NO_MD5, 0),
            b"/none": encode_data(LIVE, [a, b], 5, 1, NO_MD5, 0),
            b"/ok": encode_data(LIVE, [b, a], 5, 1, NO_MD5, 0),
            b"/pending": bytes((PENDING,)) + b"p" + bytes(12) + a.encode() + b"\n",
            b"/short": encode_data(LIVE, [a, b], 5, 1, NO_MD5, 0),
            b"/unlinked": encode_data(UNLINKED, [a, b], 5, 1, NO_MD5, 0)}
    store.merge_many(list(recs.items()), lambda key, current, new: new)  # as rebuild writes
    notes = Notes(str(tmp_path / "index"))
    job = Verify(Config(volumes=["v:1", "v:2"], db=str(tmp_path / "index")), store, None,
                 Progress("verify", bar=False), False)
    listed = {b"/extra": [Found(a, 5, 0), Found(b, 5, 0), Found("v:2/sv02", 5, 0)],
              b"/missing": [Found(a, 5, 0)], b"/ok": [Found(a, 5, 0), Found(b, 5, 0)],
              b"/pending": [Found(a, 5, 0)], b"/short": [Found(a, 5, 0), Found(b, 4, 0)],
              b"/unlinked": [Found(a, 5, 0), Found(b, 5, 0)],
              b"/a-norecord": [Found(a, 5, 0)], b"/z-norecord": [Found("v:1/sv005", 7, 0)]}
    for key, found in listed.items():
        notes.add(key, job.copies.encode(found))
    notes.flush()
    merge = notes.merge()
    pairs = sorted(recs.items())
    rest, orphans, done = job.quick(pairs[:3], merge)
    rest2, orphans2, done2 = job.quick(pairs[3:], merge)
    assert (done, done2) == (3, len(pairs) - 3)
    tail = merge.rest(10)
    merge.close()
    # asked of the volumes: copies missing or of the wrong size, and every record not LIVE
    assert [k for k, _ in rest + rest2] == [b"/missing", b"/none", b"/pending", b"/short", b"/unlinked"]
    assert job.progress.counts["seen"] == 2  # /extra has its two copies right; the third is an orphan
    # what admin/orphans.py must look at: files of keys with no LIVE record, or not named by it
    assert sorted(orphans) == [b"/a-norecord", b"/extra"]
    assert sorted(orphans2) == [b"/pending", b"/unlinked"]
    assert sorted(orphans[b"/extra"]) == sorted(listed[b"/extra"])
    assert [(k, job.copies.decode(v)) for k, v in tail] == [(b"/z-norecord", listed[b"/z-norecord"])]
    path = notes.path
    notes.close()
    store.close()
    assert not os.path.exists(path) and os.listdir(tmp_path) == ["index"]


def test_verify_hands_on_keys_with_no_record_a_batch_at_a_time(tmp_path, monkeypatch):
    # an index that lacks most of what the volumes hold (the wrong -db, say) must not make
    # pass 2 gather every note between two records in memory at once
    from minikv.admin import verify
    from minikv.admin.progress import Progress
    from minikv.admin.seen import Notes
    from minikv.admin.walk import Found
    from minikv.config import Config
    from minikv.index.record import LIVE, NO_MD5, encode_data

    monkeypatch.setattr(verify, "ORPHAN_BATCH", 10)
    store = Store(str(tmp_path / "index"))
    notes = Notes(str(tmp_path / "index"))
    job = verify.Verify(Config(volumes=["v:1"], db=str(tmp_path / "index")), store, None,
                        Progress("verify", bar=False), False)
    for i in range(35):
        notes.add(b"/a%02d" % i, job.copies.encode([Found("v:1", 1, 0)]))
    notes.add(b"/b", job.copies.encode([Found("v:1", 1, 0)]))
    notes.flush()
    pairs = [(b"/b", encode_data(LIVE, ["v:1"], 1, 1, NO_MD5, 0))]
    merge = notes.merge()
    sizes = []
    while True:
        rest, orphans, done = job.quick(pairs, merge)
        sizes.append(len(orphans))
        if done == len(pairs):
            break
        pairs = pairs[done:]
    merge.close()
    notes.close()
    store.close()
    assert sizes == [10, 10, 10, 5] and rest == [] and job.progress.counts["seen"] == 1


def test_a_damaged_record_is_left_for_verify_to_report_not_the_end_of_its_run(tmp_path):
    # pass 2 reads each LIVE record's size and volumes beside the notes: a truncated record, or
    # volume names that are not UTF-8, raised there and ended the whole run with a traceback
    from minikv.admin.progress import Progress
    from minikv.admin.seen import Notes
    from minikv.admin.verify import Verify
    from minikv.admin.walk import Found
    from minikv.config import Config
    from minikv.index.record import LIVE, NO_MD5, encode_data

    store = Store(str(tmp_path / "index"))
    notes = Notes(str(tmp_path / "index"))
    job = Verify(Config(volumes=["v:1"], db=str(tmp_path / "index")), store, None, Progress("verify", bar=False), False)
    good = encode_data(LIVE, ["v:1"], 1, 1, NO_MD5, 0)
    long_name = encode_data(LIVE, ["v:1/" + "z" * 256], 1, 1, NO_MD5, 0)  # a lost comma: a name past 255 bytes
    pairs = [(b"/a", b""), (b"/b", b"L\x01"), (b"/c", good[:-3] + b"\xff\xfe\xfd"), (b"/c2", long_name), (b"/d", good)]
    for key, _ in pairs:
        notes.add(key, job.copies.encode([Found("v:1", 1, 0)]))
    notes.flush()
    merge = notes.merge()
    rest, orphans, done = job.quick(pairs, merge)
    merge.close()
    notes.close()
    store.close()
    assert [k for k, _ in rest] == [b"/a", b"/b", b"/c", b"/c2"] and done == 5 and job.progress.counts["seen"] == 1


def test_copies_are_noted_in_a_form_the_record_gives_too():
    from minikv.admin.seen import Copies
    from minikv.admin.walk import Found

    c = Copies(["h:1", "h:2", "h:3"])
    found = [Found("h:3/sv0A", 9, 5), Found("h:1", 9, 6), Found("h:2/sv1FF", 9, 7)]
    noted = c.encode(found)
    assert noted == c.encode(found[::-1]) == c.expected(["h:1", "h:2/sv1FF", "h:3/sv0A"], 9)
    assert sorted(c.decode(noted)) == sorted(f._replace(mtime_ms=0) for f in found)
    assert c.expected(["h:1", "h:2/sv1FF", "h:3/sv0A"], 8) != noted
    assert c.expected(["h:1", "h:2/sv1FF"], 9) != noted
    assert c.expected(["h:1", "h:4", "h:3/sv0A"], 9) is None  # not a volume of -volumes: never listed
    # a subvolume folder named otherwise than placement names them keeps its name
    odd = [Found("h:1/sv005", 3, 0), Found("h:2/sv05", 3, 0), Found("h:3/svXY", 3, 0)]
    assert sorted(c.decode(c.encode(odd))) == odd


def test_a_records_volumes_give_what_their_listing_is_noted_as_whatever_the_names(monkeypatch):
    # verify's pass 2 compares a record with its notes through Copies.named (ids sorted without
    # the size, remembered per volumes field): the same bytes as encode of the copies listed,
    # for every mix of canonical, oddly named and absent subvolumes, in any order
    import itertools
    import random

    from minikv.admin import seen
    from minikv.admin.seen import Copies
    from minikv.admin.walk import Found

    monkeypatch.setattr(seen, "NAMED_MAX", 7)  # forgotten all at once past it, and right after
    c = Copies(["h:1", "h:2", "h:3"])
    kinds = ["", "/sv00", "/sv0A", "/sv1FF", "/sv005", "/svXY", "/sv0a", "/x"]
    rng = random.Random(5)
    for _ in range(400):
        hosts = rng.sample(["h:1", "h:2", "h:3"], rng.randint(1, 3))
        volumes = [h + rng.choice(kinds) for h in hosts]
        extra = f"h:1/sv0{rng.randint(0, 9)}"
        if rng.random() < 0.2 and extra not in volumes:
            volumes.append(extra)  # two on one host
        size = rng.choice([0, 1, 255, 256, 2**40 + 3])
        names, ids = c.named(",".join(volumes).encode())
        assert names == volumes
        want = c.encode([Found(v, size, 0) for v in volumes])
        assert ids is not None and want == c.expected(volumes, size)
        tail = size.to_bytes(8, "little")
        assert tail.join(ids) + tail == want, volumes
    for volumes in itertools.permutations(["h:1/sv01", "h:4/sv01", "h:2"]):  # h:4: not a volume of -volumes
        assert c.named(",".join(volumes).encode())[1] is None and c.expected(list(volumes), 1) is None
    assert len(c._named) <= seen.NAMED_MAX
