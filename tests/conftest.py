import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cluster import Cluster, open_dir  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A 3-volume cluster (3 replicas, 10 subvolumes, 2 workers) shared by a test module."""
    root = open_dir()
    c = Cluster(root)
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_cluster():
    """Start a cluster of one's own (for tests that stop volumes or the index)."""
    root = open_dir()
    made = []

    def make(**kw):
        c = Cluster(root / f"c{len(made)}", **kw)
        made.append(c)  # before start: a start that fails half-way is stopped too
        return c.start()

    yield make
    for c in made:
        c.stop()
    shutil.rmtree(root, ignore_errors=True)
