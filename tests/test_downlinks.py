"""Downlink life cycle end to end: simulated devices over real UDP, the queue, the database."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import cbor2
import pytest
from aiocoap.numbers.codes import Code
from sqlalchemy import select, update

from driver_core.downlinks import DownlinkError, wire_id
from driver_core.driver import Driver
from driver_core.enrollment import add_device
from driver_core.events import EVENT_DOWNLINK_STATE
from driver_core.storage.models import Downlink, DownlinkEvent
from driver_core.timefmt import utcnow
from tests.conftest import enrolled_session, make_device, session_for, started_driver, write_config

RX = cbor2.dumps({1: 90, 14: 3000})


class StateLog:
    """Downlink state events from the bus, per command_id."""

    def __init__(self) -> None:
        import asyncio

        self.events = []
        self._grew = asyncio.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        self._grew.set()

    def states(self, command_id: str) -> list[int]:
        return [e.state for e in self.events if e.command_id == command_id]

    async def wait_state(self, command_id: str, state: int, timeout: float = 10.0) -> None:
        import asyncio

        async with asyncio.timeout(timeout):
            while state not in self.states(command_id):
                self._grew.clear()
                await self._grew.wait()


@pytest.fixture
def states(running_driver: Driver) -> StateLog:
    log = StateLog()
    running_driver.bus.listen(EVENT_DOWNLINK_STATE, log)
    return log


async def joined_device(enroll, serial="B0000001", hw_type=17, index=20):
    session = await enroll(make_device(serial, hw_type, index))
    await session.join("1.0.0", hw_type)
    return session


async def test_sent_then_acknowledged(running_driver, enroll, states):
    session = await joined_device(enroll)
    view, created = await running_driver.downlinks.schedule("B0000001", "tx_interval", 30, "cmd-1")
    assert created and view.state == 0 and view.parameter == 30 and view.code == 16
    answer = await session.post("rx", RX)
    assert answer.code == Code.CHANGED
    assert answer.body == {3: 0, 4: [view.downlink_id, 16, 30]}
    ack = await session.post("ack", cbor2.dumps([view.downlink_id, 0]))
    assert ack.code == Code.CHANGED and ack.payload == b""
    assert states.states("cmd-1") == [0, 2, 3]
    final = await running_driver.downlinks.get("cmd-1")
    assert final.state == 3 and final.result == 0
    assert final.inserted_at <= final.dispatched_at <= final.acknowledged_at
    assert final.canceled_at is None and final.unacknowledged_at is None


async def test_refused_by_the_device(running_driver, enroll, states):
    session = await joined_device(enroll)
    view, _ = await running_driver.downlinks.schedule("B0000001", "reboot", 1, "cmd-2")
    answer = await session.post("rx", RX)
    assert answer.body == {3: 0, 4: [view.downlink_id, 1, 1]}
    await session.post("ack", cbor2.dumps([view.downlink_id, 7]))
    final = await running_driver.downlinks.get("cmd-2")
    assert (final.state, final.result) == (4, 7)
    assert states.states("cmd-2") == [0, 2, 4]


async def test_unacknowledged_when_the_next_rx_comes(running_driver, enroll, states):
    session = await joined_device(enroll)
    view, _ = await running_driver.downlinks.schedule("B0000001", "clear_alarms", None, "cmd-3")
    first = await session.post("rx", RX)
    assert first.body[4][0] == view.downlink_id
    second = await session.post("rx", RX)
    assert second.code == Code.CHANGED and second.payload == b""
    assert states.states("cmd-3") == [0, 2, 5]
    late_ack = await session.post("ack", cbor2.dumps([view.downlink_id, 0]))
    assert late_ack.code == Code.CHANGED  # published, but 5 is final
    assert (await running_driver.downlinks.get("cmd-3")).state == 5


async def test_unacknowledged_after_the_ack_timeout(tmp_path: Path):
    config_dir = tmp_path / "config"
    write_config(config_dir, extra="downlinks:\n  ack_timeout: 1\n")
    async with started_driver(config_dir) as driver:
        log = StateLog()
        driver.bus.listen(EVENT_DOWNLINK_STATE, log)
        session = await enrolled_session(driver, make_device("B0000002", 17, 21))
        await session.join("1.0.0", 17)
        await driver.downlinks.schedule("B0000002", "reboot", 1, "cmd-4")
        await session.post("rx", RX)
        await log.wait_state("cmd-4", 5, timeout=10)
        assert log.states("cmd-4") == [0, 2, 5]
        view = await driver.downlinks.get("cmd-4")
        assert view.unacknowledged_at - view.dispatched_at >= timedelta(seconds=1)


async def test_cancel_only_while_pending(running_driver, enroll, states):
    session = await joined_device(enroll)
    await running_driver.downlinks.schedule("B0000001", "reboot", 1, "cmd-5")
    await running_driver.downlinks.schedule("B0000001", "clear_alarms", 1, "cmd-6")
    canceled = await running_driver.downlinks.cancel("cmd-6")
    assert canceled.state == 1 and canceled.canceled_at is not None
    answer = await session.post("rx", RX)
    assert answer.body[3] == 0  # the canceled one is not counted
    with pytest.raises(DownlinkError) as refused:
        await running_driver.downlinks.cancel("cmd-5")
    assert refused.value.status == 409
    assert refused.value.detail == (
        "only pending downlinks can be canceled; this one is in state 2 (Sent, waiting for acknowledgement)"
    )
    assert states.states("cmd-6") == [0, 1]


async def test_a_queue_of_three_drains_in_one_wake_up(running_driver, enroll, states):
    session = await joined_device(enroll)
    ids = []
    for n, (command, parameter) in enumerate([("reboot", 1), ("tx_interval", 15), ("sampling_interval", 2)]):
        view, _ = await running_driver.downlinks.schedule("B0000001", command, parameter, f"q-{n}")
        ids.append(view.downlink_id)
    answer = await session.post("rx", RX)
    assert answer.body == {3: 2, 4: [ids[0], 1, 1]}
    answer = await session.post("ack", cbor2.dumps([ids[0], 0]))
    assert answer.body == {3: 1, 4: [ids[1], 16, 15]}
    answer = await session.post("ack", cbor2.dumps([ids[1], 0]))
    assert answer.body == {3: 0, 4: [ids[2], 17, 2]}
    answer = await session.post("ack", cbor2.dumps([ids[2], 0]))
    assert answer.payload == b""
    for n in range(3):
        assert states.states(f"q-{n}") == [0, 2, 3]


async def test_join_answer_carries_a_pending_downlink(running_driver, enroll):
    device = make_device("B0000003", 24, 22)
    session = await enroll(device)
    view, _ = await running_driver.downlinks.schedule("B0000003", "set_position", 40, "before-join")
    answer = await session.join("1.0.0", 24)
    assert answer.body[3] == 0 and answer.body[4] == [view.downlink_id, view.code, 40]


async def test_restart_between_schedule_and_delivery_and_no_double_delivery(tmp_path: Path):
    config_dir = tmp_path / "config"
    write_config(config_dir)
    device = make_device("B0000004", 17, 23)

    async def start() -> Driver:
        driver = Driver(config_dir)
        await driver.start()
        return driver

    driver = await start()
    await add_device(driver.db, driver.box, device)
    session = session_for(driver, device)
    await session.join("1.0.0", 17)
    await driver.downlinks.schedule("B0000004", "reboot", 1, "r-1")
    await driver.downlinks.schedule("B0000004", "clear_alarms", 1, "r-2")
    port = driver.coap_port
    await driver.stop()

    write_config(config_dir, coap_port=port)
    driver = await start()
    try:
        first = await session.post("rx", RX)
        assert first.body[4][1] == 1 and first.body[3] == 1
        await driver.stop()
        driver = await start()
        second = await session.post("rx", RX)  # r-1 was never acked: 5, and r-2 goes out
        assert second.body[4][1] == 3 and second.body[3] == 0
        assert (await driver.downlinks.get("r-1")).state == 5
        async with driver.db.session() as db:
            sent = (await db.execute(select(DownlinkEvent.state).where(DownlinkEvent.command_id == "r-1"))).scalars().all()
        assert sent == [0, 2, 5]
    finally:
        await driver.stop()


async def test_schedule_validation_and_idempotency(running_driver, enroll):
    await joined_device(enroll)
    queue = running_driver.downlinks
    view, created = await queue.schedule("B0000001", "tx_interval", 30, "same")
    again, created_again = await queue.schedule("B0000001", "tx_interval", 30, "same")
    assert (created, created_again) == (True, False) and again == view
    with pytest.raises(DownlinkError) as conflict:
        await queue.schedule("B0000001", "tx_interval", 31, "same")
    assert (conflict.value.status, conflict.value.field) == (409, "command_id")
    with pytest.raises(DownlinkError) as bad_parameter:
        await queue.schedule("B0000001", "tx_interval", 4)
    assert (bad_parameter.value.status, bad_parameter.value.field) == (400, "parameter")
    assert bad_parameter.value.detail == "tx_interval must be between 5 and 1440 min, got 4"
    with pytest.raises(DownlinkError) as bad_command:
        await queue.schedule("B0000001", "self_destruct", 1)
    assert (bad_command.value.status, bad_command.value.field) == (400, "command")
    assert bad_command.value.detail.startswith("unknown command 'self_destruct' for hw_type 17; allowed: ")
    with pytest.raises(DownlinkError) as unknown:
        await queue.schedule("NOPE", "reboot", 1)
    assert unknown.value.status == 404
    with pytest.raises(DownlinkError) as too_long:
        await queue.schedule("B0000001", "reboot", 1, "x" * 129)
    assert (too_long.value.status, too_long.value.field) == (400, "command_id")
    async with running_driver.db.session() as db:
        count = len((await db.execute(select(Downlink))).scalars().all())
    assert count == 1


async def test_retention_purges_final_downlinks_only(running_driver, enroll):
    await joined_device(enroll)
    queue = running_driver.downlinks
    await queue.schedule("B0000001", "reboot", 1, "old-pending")
    await queue.schedule("B0000001", "reboot", 1, "old-canceled")
    await queue.schedule("B0000001", "reboot", 1, "new-canceled")
    await queue.cancel("old-canceled")
    await queue.cancel("new-canceled")
    long_ago = utcnow() - timedelta(days=31)
    async with running_driver.db.session() as db, db.begin():
        await db.execute(
            update(Downlink)
            .where(Downlink.command_id.in_(["old-pending", "old-canceled"]))
            .values(updated_at=long_ago, inserted_at=long_ago)
        )
    assert await queue.purge(30) == 1
    async with running_driver.db.session() as db:
        left = set((await db.execute(select(Downlink.command_id))).scalars())
    assert left == {"old-pending", "new-canceled"}


def test_wire_ids_wrap_within_uint16():
    assert [wire_id(n) for n in (1, 2, 65535, 65536, 65537)] == [1, 2, 65535, 1, 2]


async def test_an_acknowledged_tx_interval_becomes_the_devices_interval(running_driver, enroll):
    from driver_core.storage.models import Device

    session = await joined_device(enroll)
    view, _ = await running_driver.downlinks.schedule("B0000001", "tx_interval", 15, "tx-15")
    await session.post("rx", RX)
    await session.post("ack", cbor2.dumps([view.downlink_id, 0]))
    async with running_driver.db.session() as db:
        stored = (await db.execute(select(Device).where(Device.serial == "B0000001"))).scalar_one()
    assert stored.tx_interval == 15
    again = await session.join("1.0.1", 17)  # the JOIN answer now carries the new interval
    assert again.body[1] == 15
