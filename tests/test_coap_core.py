"""JOIN (RFC 8613 B.2) and data requests over real UDP against a running driver."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import cbor2
import pytest
from aiocoap.numbers.codes import Code

from driver_core.device_client import JoinRefused
from driver_core.driver import Driver
from driver_core.enrollment import add_device
from driver_core.events import EVENT_UPLINK
from driver_core.security import DeviceContext
from driver_core.storage.models import Device, SecurityContext
from driver_core.timefmt import utcnow
from driver_core.writer import WriteJob, write_batch
from tests.conftest import UplinkLog, make_device, session_for

RX_PRESSURE = cbor2.dumps({1: 87, 3: -71, 14: 2310})


async def test_join_then_rx_reaches_the_bus_with_documented_fields(running_driver, uplinks, enroll):
    device = make_device("A0000001", 17, 1)
    session = await enroll(device)
    before = int(time.time())
    answer = await session.join("2.1.0", 17, reset_cause=1)
    assert answer.code == Code.CHANGED
    assert set(answer.body) == {1, 2, 3}
    assert answer.body[1] == 60 and answer.body[3] == 0
    assert before <= answer.body[2] <= int(time.time())

    rx = await session.post("rx", RX_PRESSURE)
    assert rx.code == Code.CHANGED and rx.payload == b""
    join_event, rx_event = await uplinks.wait_for(2)

    join_doc, rx_doc = join_event.document(), rx_event.document()
    assert join_doc["message_type"] == "join"
    assert join_doc["data"] == {"firmware": "2.1.0", "hw_type": 17, "reset_cause": 1}
    assert join_doc["last_seen"] is None
    assert list(rx_doc) == [
        "protocol", "rx_date", "hw_type", "message_type", "serial", "join_date", "last_seen", "data",
    ]
    assert rx_doc["protocol"] == 2
    assert rx_doc["hw_type"] == "17"
    assert rx_doc["serial"] == "A0000001"
    assert rx_doc["message_type"] == "rx"
    assert rx_doc["join_date"] == join_doc["join_date"]
    assert rx_doc["last_seen"] == join_event.rx_date.strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{join_event.rx_date.microsecond // 1000:03d}Z"
    )
    assert rx_event.outbox_id is None  # no MQTT integration configured: no outbox row

    async with running_driver.db.session() as db:
        stored = await db.get(Device, running_driver.credentials.cached(device.sender_id).device_id)
        context = await db.get(SecurityContext, stored.id)
    assert stored.firmware == "2.1.0"
    assert stored.join_date == join_event.rx_date
    assert stored.last_seen == rx_event.rx_date
    assert context.id_context == session.context.id_context
    assert len(context.id_context) == 24


@pytest.mark.parametrize("style", ["absent", "raw", "wrapped"])
async def test_kid_context_after_join_may_be_absent_raw_or_wrapped(running_driver, uplinks, enroll, style):
    device = make_device("A0000002", 24, 2)
    session = await enroll(device)
    await session.join("1.0.0", 24)
    session.kid_context_style = style
    answer = await session.post("rx", cbor2.dumps({1: 55}))
    assert answer.protected and answer.code in (Code.CHANGED, Code.BAD_REQUEST)
    events = await uplinks.wait_for(2)
    assert events[1].message_type == "rx"


async def test_unknown_kid_gets_security_context_not_found(running_driver, uplinks):
    stranger = make_device("Z0000001", 17, 9)
    session = session_for(running_driver, stranger)
    with pytest.raises(JoinRefused) as refused:
        await session.join("1.0.0", 17)
    assert refused.value.code == Code.UNAUTHORIZED
    assert refused.value.payload == b"Security context not found"
    assert running_driver.refusals.counts["unknown_kid"] == 1
    assert uplinks.items == []


async def test_wrong_key_gets_decryption_failed(running_driver, uplinks, enroll):
    device = make_device("A0000003", 28, 3)
    await enroll(device)
    impostor = make_device("A0000003", 28, 4)
    impostor.sender_id = device.sender_id
    with pytest.raises(JoinRefused) as refused:
        await session_for(running_driver, impostor).join("1.0.0", 28)
    assert refused.value.code == Code.BAD_REQUEST
    assert refused.value.payload == b"Decryption failed"
    assert running_driver.refusals.counts["decryption_failed"] == 1
    assert uplinks.items == []


async def test_replayed_request_is_refused_also_after_restart(tmp_path: Path):
    from driver_core.enrollment import add_device
    from tests.conftest import write_config

    config_dir = tmp_path / "config"
    write_config(config_dir)
    driver = Driver(config_dir)
    await driver.start()
    log = UplinkLog()
    driver.bus.listen(EVENT_UPLINK, log)
    device = make_device("A0000004", 17, 5)
    await add_device(driver.db, driver.box, device)
    session = session_for(driver, device)
    await session.join("1.0.0", 17)
    outer, request_id = session.protect("rx", RX_PRESSURE)
    first = await session.send_raw(outer, request_id)
    assert first.code == Code.CHANGED
    replay = await session.send_raw(outer, request_id)
    assert (replay.protected, replay.code, replay.payload) == (False, Code.UNAUTHORIZED, b"Replay detected")
    assert driver.refusals.counts["replay"] == 1
    port = driver.coap_port
    await driver.stop()

    # Same configuration directory, new process state: the replay window was persisted.
    write_config(config_dir, coap_port=port)
    driver = Driver(config_dir)
    await driver.start()
    try:
        again = await session.send_raw(outer, request_id)
        assert (again.protected, again.code, again.payload) == (False, Code.UNAUTHORIZED, b"Replay detected")
        fresh = await session.post("rx", RX_PRESSURE)  # no re-JOIN needed after a restart
        assert fresh.protected and fresh.code == Code.CHANGED
    finally:
        await driver.stop()
    assert len(log.items) == 2


async def test_superseded_context_is_refused(running_driver, uplinks, enroll):
    device = make_device("A0000005", 16, 6)
    old = await enroll(device)
    await old.join("1.0.0", 16)
    new = session_for(running_driver, device)
    await new.join("1.0.0", 16)
    old.kid_context_style = "wrapped"
    refused = await old.post("rx", RX_PRESSURE)
    assert (refused.protected, refused.code, refused.payload) == (
        False, Code.UNAUTHORIZED, b"Security context not found",
    )
    old.kid_context_style = "absent"
    refused = await old.post("rx", RX_PRESSURE)
    assert (refused.protected, refused.code, refused.payload) == (False, Code.BAD_REQUEST, b"Decryption failed")
    accepted = await new.post("rx", RX_PRESSURE)
    assert accepted.code == Code.CHANGED
    assert [u.message_type for u in await uplinks.wait_for(3)] == ["join", "join", "rx"]


async def test_replayed_join_step3_cannot_bring_back_an_old_context(running_driver, uplinks, enroll):
    device = make_device("A0000006", 18, 7)
    session = await enroll(device)
    captured = []
    from driver_core import device_client

    real_exchange = device_client.exchange

    async def recording_exchange(host, port, request, timing=None):
        captured.append(request)
        return await real_exchange(host, port, request, timing)

    device_client.exchange = recording_exchange
    try:
        await session.join("1.0.0", 18)
    finally:
        device_client.exchange = real_exchange
    step3 = captured[-1]
    await session.join("1.0.0", 18)  # a newer context replaces the first
    answer = await real_exchange("127.0.0.1", running_driver.coap_port, step3, session.timing)
    assert (answer.code, answer.payload) == (Code.UNAUTHORIZED, b"Security context not found")
    ok = await session.post("rx", RX_PRESSURE)
    assert ok.code == Code.CHANGED


async def test_malformed_cbor_gets_4_00_and_is_still_published(running_driver, uplinks, enroll):
    device = make_device("A0000007", 17, 8)
    session = await enroll(device)
    await session.join("1.0.0", 17)
    answer = await session.post("rx", b"\xa1\x01")  # map announced, value missing
    assert answer.protected and answer.code == Code.BAD_REQUEST
    events = await uplinks.wait_for(2)
    assert events[1].data == {
        "raw": "a101",
        "error": "truncated CBOR: the 2-byte payload ends inside a data item",
    }
    assert answer.payload == b"truncated CBOR: the 2-byte payload ends inside a data item"
    assert running_driver.refusals.counts["bad_payload"] == 1


async def test_garbage_datagrams_are_counted_and_harmless(running_driver, uplinks, enroll):
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=("127.0.0.1", running_driver.coap_port)
    )
    for junk in (b"", b"\x00", b"\xff" * 40, b"GET / HTTP/1.1\r\n\r\n"):
        transport.sendto(junk)
    transport.close()
    device = make_device("A0000008", 31, 10)
    session = await enroll(device)
    answer = await session.join("1.0.0", 31)  # the listener still serves devices
    assert answer.code == Code.CHANGED
    # The HTTP line decodes as a CoAP CON 2.05 response (0x47 0x45...): a RST, not a refusal.
    assert running_driver.refusals.counts["malformed_datagram"] == 3


async def test_unknown_resource_gets_protected_4_04(running_driver, uplinks, enroll):
    device = make_device("A0000009", 23, 11)
    session = await enroll(device)
    await session.join("1.0.0", 23)
    answer = await session.post("config", b"")
    assert answer.protected and answer.code == Code.NOT_FOUND
    assert running_driver.refusals.counts["unknown_resource"] == 1


async def test_oversized_payload_gets_4_13(running_driver, uplinks, enroll):
    device = make_device("A0000010", 14, 12)
    session = await enroll(device)
    await session.join("1.0.0", 14)
    answer = await session.post("rx", cbor2.dumps({1: b"x" * 1050}))
    assert answer.protected and answer.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert running_driver.refusals.counts["oversized_payload"] == 1
    assert [u.message_type for u in await uplinks.wait_for(1)] == ["join"]


async def test_unprotected_request_gets_4_01(running_driver):
    import aiocoap

    from driver_core.device_client import exchange

    request = aiocoap.Message(code=Code.POST, uri_path=["rx"], payload=b"\xa0")
    answer = await exchange("127.0.0.1", running_driver.coap_port, request)
    assert (answer.code, answer.payload) == (Code.UNAUTHORIZED, b"OSCORE required")
    assert running_driver.refusals.counts["unprotected"] == 1


async def test_removed_device_is_refused_and_new_enrollment_is_seen_at_once(running_driver, enroll):
    from driver_core.enrollment import delete_device

    device = make_device("A0000011", 17, 13)
    session = await enroll(device)
    await session.join("1.0.0", 17)
    late = make_device("A0000012", 17, 14)
    late_session = session_for(running_driver, late)
    with pytest.raises(JoinRefused):
        await late_session.join("1.0.0", 17)  # not enrolled yet: remembered as unknown
    await delete_device(running_driver.db, "A0000011")  # as another process would
    await enroll(late)
    await running_driver.credentials.reconcile()
    refused = await session.post("rx", RX_PRESSURE)
    assert (refused.code, refused.payload) == (Code.UNAUTHORIZED, b"Security context not found")
    assert (await late_session.join("1.0.0", 17)).code == Code.CHANGED


async def test_block_wise_uplink_is_refused_clearly(running_driver, enroll):
    import aiocoap
    from aiocoap.optiontypes import BlockOption

    device = make_device("A0000013", 17, 15)
    session = await enroll(device)
    await session.join("1.0.0", 17)
    request = aiocoap.Message(code=Code.POST, uri_path=["rx"], payload=b"\xa1\x01\x02")
    request.opt.block1 = BlockOption.BlockwiseTuple(0, True, 2)
    outer, request_id = session.context.protect(request, kid_context=False)
    answer = await session.send_raw(outer, request_id)
    assert answer.protected and answer.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert answer.payload == b"Block-wise uplinks are not supported; send at most 1024 bytes"


async def test_concurrent_cache_misses_are_read_in_one_query(running_driver):
    devices = [make_device(f"L{i:07d}", 17, 100 + i) for i in range(20)]
    for device in devices:
        await add_device(running_driver.db, running_driver.box, device)
    credentials = running_driver.credentials
    before = credentials._loads.batches
    states = await asyncio.gather(
        *(credentials.preload(device.sender_id) for device in devices), credentials.preload(b"\x7f\x7f")
    )
    assert [state.serial for state in states[:-1]] == [device.serial for device in devices]
    assert [state.master_secret for state in states[:-1]] == [device.master_secret for device in devices]
    assert states[-1] is None
    assert credentials._loads.batches == before + 1


async def test_devices_joining_together_each_get_their_own_stored_context(running_driver, uplinks, enroll):
    devices = [make_device(f"J{i:07d}", 24, 150 + i) for i in range(12)]
    sessions = [await enroll(device) for device in devices]
    answers = await asyncio.gather(*(session.join("1.0.0", 24) for session in sessions))
    assert {answer.code for answer in answers} == {Code.CHANGED}
    async with running_driver.db.session() as db:
        for device, session in zip(devices, sessions, strict=True):
            state = running_driver.credentials.cached(device.sender_id)
            stored = await db.get(SecurityContext, state.device_id)
            assert stored.id_context == session.context.id_context
    accepted = await asyncio.gather(*(session.post("rx", RX_PRESSURE) for session in sessions))
    assert {answer.code for answer in accepted} == {Code.CHANGED}


async def test_two_joins_of_one_device_in_one_batch_store_the_later(running_driver, enroll):
    device = make_device("A0000009", 17, 9)
    await enroll(device)
    state = await running_driver.credentials.preload(device.sender_id)
    state.join_date = utcnow()
    first = DeviceContext(state, "join3", b"\x01" * 24)
    first.r2_ms = 1
    second = DeviceContext(state, "join3", b"\x02" * 24)
    second.r2_ms = 2
    jobs = [WriteJob(state, first, None, joined=True), WriteJob(state, second, None, joined=True)]
    await running_driver.db.run_write(lambda session: write_batch(session, jobs))
    async with running_driver.db.session() as db:
        stored = await db.get(SecurityContext, state.device_id)
    assert (stored.id_context, stored.r2_issued_ms) == (b"\x02" * 24, 2)


class _Socket(asyncio.DatagramProtocol):
    """A raw UDP peer that keeps what it receives."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.put_nowait(data)


async def test_listener_answers_pings_with_rst_and_non_requests_with_non(running_driver):
    import aiocoap
    from aiocoap.numbers.types import Type

    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        _Socket, remote_addr=("127.0.0.1", running_driver.coap_port)
    )
    try:
        ping = aiocoap.Message(code=Code.EMPTY)
        ping.mtype, ping.mid = Type.CON, 0x1234
        transport.sendto(ping.encode())
        reset = aiocoap.Message.decode(await asyncio.wait_for(peer.received.get(), 5))
        assert (reset.mtype, reset.mid, reset.code) == (Type.RST, 0x1234, Code.EMPTY)

        request = aiocoap.Message(code=Code.POST, uri_path=["rx"], payload=b"\xa0")
        request.mtype, request.mid, request.token = Type.NON, 0x2222, b"\x01\x02"
        transport.sendto(request.encode())
        answer = aiocoap.Message.decode(await asyncio.wait_for(peer.received.get(), 5))
        assert (answer.mtype, answer.token, answer.code, answer.payload) == (
            Type.NON, b"\x01\x02", Code.UNAUTHORIZED, b"OSCORE required",
        )
        assert answer.mid != 0x2222  # a NON answer has a message id of its own
    finally:
        transport.close()
