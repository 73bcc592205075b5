"""The standby harness cleans up after itself, also when the test inside it fails: both
servers stopped, their ports free, the temporary directory gone."""

from __future__ import annotations

import pytest

from tests.services import reachable
from tests.standby import StandbyPair, standby_pair

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Boom(Exception):
    pass


def test_a_failing_block_still_stops_and_removes_both_servers() -> None:
    seen: list[StandbyPair] = []
    with pytest.raises(Boom), standby_pair() as pair:
        seen.append(pair)
        assert pair.streaming_standbys() == 1
        assert reachable("127.0.0.1", pair.standby_port)
        raise Boom
    [pair] = seen
    assert not pair.root.exists()
    assert not reachable("127.0.0.1", pair.primary_port)
    assert not reachable("127.0.0.1", pair.standby_port)
