"""The PostgreSQL path (a fleet's shared database) against a real server.

.ci/run installs and starts Debian's PostgreSQL on loopback and sets PBF_TEST_POSTGRES_URL;
without it these tests are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from monitor.cli import main
from monitor.store import migrate
from monitor.store.connect import open_db
from tests.test_alarm_daemon import RULE, Rig, bright_weights, rig  # noqa: F401 (fixtures)

URL = os.environ.get("PBF_TEST_POSTGRES_URL", "")
pytestmark = pytest.mark.skipif(not URL, reason="set PBF_TEST_POSTGRES_URL (.ci/run does)")


@pytest.fixture
def clean_db() -> Iterator[str]:
    """An empty database: every table dropped before and after."""

    def wipe() -> None:
        engine = create_engine(URL)
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()

    wipe()
    yield URL
    wipe()


def test_migrations_on_postgres(clean_db: str) -> None:
    engine = open_db(clean_db)
    try:
        assert migrate.current(engine) == migrate.head()
    finally:
        engine.dispose()


def test_daemon_on_postgres(clean_db: str, rig: Callable[..., Rig]) -> None:  # noqa: F811
    r = rig(RULE, store_url=clean_db)
    for n in (1, 2, 3):
        r.write(n, (20, 20, 10, 10))
    assert [(a["state"], a["layer"]) for a in r.alarms()] == [("open", 2)]
    out = CliRunner().invoke(main, ["report", "B1", "--config", str(r.config), "--format",
                                    "json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert [x["layer"] for x in report["layers"]] == [1, 2, 3]
    assert report["layers"][1]["classes"]["swelling"]["pixel_count"] == 100
    listing = CliRunner().invoke(main, ["builds", "--config", str(r.config), "--json"])
    assert '"B1"' in listing.output
