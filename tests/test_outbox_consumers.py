"""The MQTT outbox holds rows only while an MQTT integration is there to publish them.

Real driver, real UDP, the machine's Mosquitto; no MQTT in the configuration
unless the test saves it.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path

import cbor2
import pytest
from aiocoap.numbers.codes import Code
from sqlalchemy import func, insert, select

from driver_core.driver import Driver
from driver_core.housekeeping import purge_unconsumed_outbox
from driver_core.storage.models import OutboxMessage, UplinkRecord
from tests.conftest import enrolled_session, make_device, started_driver, write_config
from tests.mqtt_helpers import SYSTEM_BROKER_PORT, Collector, wait_until

RX = cbor2.dumps({1: 90, 14: 3000})


async def count(driver: Driver, table) -> int:
    async with driver.db.session() as session:
        return int((await session.execute(select(func.count(table.id)))).scalar_one())


async def test_no_outbox_rows_without_mqtt_and_uplinks_published_once_it_is_enabled(
    tmp_path: Path,
) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir)
    async with started_driver(config_dir) as driver:
        session = await enrolled_session(driver, make_device("O0000001", 17, 70))
        assert (await session.join("1.0.0", 17)).code == Code.CHANGED
        for _ in range(5):
            assert (await session.post("rx", RX)).code == Code.CHANGED
        assert (await count(driver, UplinkRecord), await count(driver, OutboxMessage)) == (6, 0)

        prefix = f"outbox-{uuid.uuid4().hex[:8]}"
        collector = await Collector(SYSTEM_BROKER_PORT, f"{prefix}/#").start()
        try:
            await driver.integrations.save(
                "mqtt",
                {"broker": "external", "url": "mqtt://127.0.0.1:1883",
                 "uplink_topic": prefix + "/{{serial}}/uplink"},
            )
            await driver.integrations.apply_saved()
            mqtt = driver.integrations.running["mqtt"]
            await mqtt.async_wait_status(lambda s: s["connected"], within=10)
            assert (await session.post("rx", RX)).code == Code.CHANGED
            await collector.wait_for(1)
            await collector.sync()
            assert [(m.topic, json.loads(m.payload)["message_type"]) for m in collector.messages] == [
                (f"{prefix}/O0000001/uplink", "rx")
            ]
            await mqtt.async_wait_status(lambda s: s["outbox"] == 0, within=10)
            assert await count(driver, OutboxMessage) == 0
        finally:
            await collector.stop()


async def add_rows(driver: Driver, owners: list[int | None]) -> None:
    async with driver.db.session() as session, session.begin():
        for owner in owners:
            await session.execute(
                insert(OutboxMessage).values(
                    serial="O0000002", document="{}", created_at=datetime.now(UTC), instance_id=owner
                )
            )


async def test_rows_left_from_an_earlier_mqtt_configuration_are_purged_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir)
    async with started_driver(config_dir) as driver:
        await add_rows(driver, [None, None, None])  # as an earlier run with MQTT left them
    with caplog.at_level(logging.INFO, logger="driver_core.housekeeping"):
        async with started_driver(config_dir) as driver:
            await wait_until(lambda: _none_left(driver), what="outbox purged at start")
    assert PURGED.format(3) in [r.getMessage() for r in caplog.records]


async def _none_left(driver: Driver) -> bool:
    return await count(driver, OutboxMessage) == 0


async def test_a_cluster_instance_purges_only_its_own_rows(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config_dir = tmp_path / "config"
    write_config(
        config_dir, postgres_url,
        extra="cluster:\n  enabled: true\n  heartbeat_seconds: 1\n  dead_after_seconds: 3\n",
    )
    async with started_driver(config_dir) as driver:
        mine = driver.db.instance_id
        other = mine + 1000  # another instance's rows: it publishes them, or adopts them later
        await add_rows(driver, [mine, mine, other])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="driver_core.housekeeping"):
            assert await purge_unconsumed_outbox(driver) == 2
        async with driver.db.session() as session:
            left = (await session.execute(select(OutboxMessage.instance_id))).scalars().all()
        assert left == [other]
        assert [r.getMessage() for r in caplog.records] == [PURGED.format(2)]


PURGED = "No MQTT integration is configured: deleted {} uplink document(s) left in the MQTT outbox"
