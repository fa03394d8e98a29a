"""Operating a cluster: `minikv rebuild | rebalance | verify | repair | gc`.

Each command takes the server's flags (`-volumes -db -replicas -subvolumes`; give -volumes exactly
as the server has it, since records name volumes by those strings) plus `-concurrency N`
(transfers at once, default 64) and, where it changes data, `-dry-run`. Each shows a progress
bar on a terminal, prints one line per problem and a summary at the end, and exits 0 when all
went well, 1 when something failed or (verify) was found, 2 on a usage error, 130 when stopped.

    rebuild    the index from the volumes alone (lost index, or a Go minikeyvalue cluster):
               unlinked keys come back LIVE and records have no md5 unless -md5 (rebuild.py);
               over HTTP, or from the volume folders given (VOLUME_DIR ..., local.py)
    rebalance  every key onto the volumes placement names now, after -volumes changed;
               offline (-db) or online through a running index (-server host:port)
    verify     every replica present with the right size (-md5: content); orphan files
    repair     re-replicate from a right copy, move misplaced keys; -delete-orphans
    gc         files of UNLINKED keys older than -age, locks left by dead processes,
               old files in VOLUME_DIR/body_temp for the directories given; -delete-orphans

Safe while the index server runs on the same -db: a key is only changed under its record's
lock (PENDING, as the server's own writes), never held across a crash (see common.py), and a
value is always streamed volume to volume, never whole in memory. Interrupting any of them
(Ctrl-C finishes the keys in flight, a kill -9 leaves locks that the next run resolves) and
running it again completes the work.

Modules: walk.py reads the volumes' listings, local.py their folders on this machine; check.py judges a key's copies; move.py moves one
key (also the server's REBALANCE); orphans.py finds and deletes unnamed copies; progress.py and
common.py are the shared plumbing.
"""
