"""One format of run id for every trigger (issue 22, item 11): the CLI names its run
(``20261204T061500Z-1a2b3c4d``); a coordinator message that names none (beat, ``celery call``,
Flower's API) gets one of the same format from the run store, the same for every redelivery of
that message, so a redelivered coordinator resumes its run rather than planning another."""

from __future__ import annotations

import re

import pytest

from tests.services import REDIS_URL, require, unique
from workers.run_ids import new_run_id
from workers.runs import DELIVERY_TTL_SECONDS, registry_for

pytestmark = pytest.mark.integration

FORMAT = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")


def test_a_message_without_a_run_id_gets_one_of_the_cli_format_kept_across_redeliveries(
        ) -> None:
    require("Redis", "127.0.0.1", 6379)
    store = registry_for(REDIS_URL, f"sw:{unique('ids')}")
    try:
        first = store.run_id_for_delivery("c9fb06bb-9800-4471-b99e-8e433aa6aac8", new_run_id())
        again = store.run_id_for_delivery("c9fb06bb-9800-4471-b99e-8e433aa6aac8", new_run_id())
        other = store.run_id_for_delivery("0d4c1e7a-2f3b-4c5d-8e9f-a0b1c2d3e4f5", new_run_id())
        assert FORMAT.fullmatch(first) and FORMAT.fullmatch(new_run_id())
        assert again == first and other != first
        keys = list(store.client.scan_iter(f"{store.prefix}:*"))
        assert len(keys) == 2
        assert all(0 < store.client.ttl(k) <= DELIVERY_TTL_SECONDS for k in keys)
    finally:
        for k in store.client.scan_iter(f"{store.prefix}:*"):
            store.client.delete(k)
