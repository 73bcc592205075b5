"""The standby harness applies extra settings to both servers, and cleans up after itself,
also when the test inside it fails: both servers stopped, their ports free, the temporary
directory gone."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.services import reachable
from tests.standby import StandbyPair, standby_pair

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Boom(Exception):
    pass


def test_a_failing_block_still_stops_and_removes_both_servers() -> None:
    seen: list[StandbyPair] = []
    with pytest.raises(Boom), standby_pair(extra_conf={"work_mem": "7MB"}) as pair:
        seen.append(pair)
        assert pair.streaming_standbys() == 1
        for engine in (pair.primary_engine(), pair.standby_engine()):
            with engine.connect() as conn:
                assert conn.execute(text("SHOW work_mem")).scalar_one() == "7MB"
            engine.dispose()
        raise Boom
    [pair] = seen
    assert not pair.root.exists()
    assert not reachable("127.0.0.1", pair.primary_port)
    assert not reachable("127.0.0.1", pair.standby_port)
