import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cluster import Cluster, open_dir, remove_opened  # noqa: E402


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL instance of the test run's own (tests/pg.py), for the tests of that engine."""
    from pg import Postgres, bin_dir

    if bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (`./dev test` installs it)")
    pg = Postgres().init().start()
    try:
        yield pg
    finally:
        pg.remove()


@pytest.fixture(scope="module")
def engine(request) -> str:
    """The index engine of a module's clusters: "lmdb" unless the module parametrizes it
    (`pytestmark = pytest.mark.parametrize("engine", [...], indirect=True, scope="module")`)."""
    return getattr(request, "param", "lmdb")


def pytest_sessionfinish(session, exitstatus):
    remove_opened()


def pytest_generate_tests(metafunc):
    """A module's ENGINES (e.g. ["lmdb", "postgresql"]): each of its tests that starts a cluster
    runs on each engine; its tests of pure logic run once."""
    engines = getattr(metafunc.module, "ENGINES", None)
    if engines and "engine" in metafunc.fixturenames:
        metafunc.parametrize("engine", engines, indirect=True, scope="module")


def index_db(engine: str, request) -> str | None:
    """-db for a new cluster: None (its own LMDB folder), or a new database of the test run's
    PostgreSQL."""
    if engine == "lmdb":
        return None
    import uuid

    return request.getfixturevalue("postgres").create_db("t" + uuid.uuid4().hex[:12])


@pytest.fixture(scope="module")
def cluster(engine, request):
    """A 3-volume cluster (3 replicas, 10 subvolumes, 2 workers) shared by a test module."""
    root = open_dir()
    c = Cluster(root, db=index_db(engine, request))
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_cluster(engine, request):
    """Start a cluster of one's own (for tests that stop volumes or the index)."""
    root = open_dir()
    made = []

    def make(**kw):
        kw.setdefault("db", index_db(engine, request))
        c = Cluster(root / f"c{len(made)}", **kw)
        made.append(c)  # before start: a start that fails half-way is stopped too
        return c.start()

    yield make
    for c in made:
        c.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def data():
    """A data folder for `minikv up` that does not exist yet (up makes it), removed afterwards."""
    root = open_dir()
    yield root / "data"
    shutil.rmtree(root, ignore_errors=True)
