"""Two driver instances on one PostgreSQL database and one broker (`cluster: true`).

Devices alternate between the instances, as behind a UDP load balancer with no
affinity. Everything is real: two Driver objects (the same configuration
directory, so the same secret key), the machine's PostgreSQL and Mosquitto,
devices over loopback UDP, an aiohttp server receiving callbacks.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiocoap
import aiomqtt
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from aiohttp import web
from sqlalchemy import func, insert, select

from driver_core.config import ConfigError, load_configuration
from driver_core.device_client import DeviceSession
from driver_core.driver import Driver
from driver_core.enrollment import add_device
from driver_core.storage.models import (
    Device,
    Downlink,
    DownlinkEvent,
    Instance,
    OutboxMessage,
    UplinkRecord,
)
from driver_core.timefmt import zulu_millis
from tests.conftest import make_device, session_for, write_config
from tests.http_helpers import http_endpoint
from tests.mqtt_helpers import SYSTEM_BROKER_PORT, Collector, wait_until

RX = cbor2.dumps({1: 90, 14: 3000})


@dataclass
class Pair:
    a: Driver
    b: Driver
    prefix: str
    collector: Collector

    def port(self, index: int) -> int:
        """Instance A for even requests, B for odd ones: a balancer with no affinity."""
        return (self.a if index % 2 == 0 else self.b).coap_port

    async def device(self, serial: str, index: int) -> DeviceSession:
        device = make_device(serial, 17, index)
        await add_device(self.a.db, self.a.box, device)
        session = session_for(self.a, device)
        assert (await session.join("1.0.0", 17)).code == Code.CHANGED
        return session


def cluster_yaml(prefix: str) -> str:
    return (
        "cluster:\n  enabled: true\n  heartbeat_seconds: 1\n  dead_after_seconds: 3\n"
        "mqtt:\n  broker: external\n  url: mqtt://127.0.0.1:1883\n"
        f"  uplink_topic: '{prefix}/{{{{serial}}}}/uplink'\n"
        f"  downlink_status_topic: '{prefix}/{{{{serial}}}}/downlink/status'\n"
        f"  downlink_command_topic: '{prefix}/{{{{serial}}}}/downlink'\n"
        "callbacks:\n  retry_for: 0\n  allowed_networks: [127.0.0.0/8]\n"  # receivers on loopback
    )


@pytest.fixture
async def pair(tmp_path: Path, postgres_url: str) -> AsyncIterator[Pair]:
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    collector = await Collector(SYSTEM_BROKER_PORT, f"{prefix}/#").start()
    config_dir = tmp_path / "config"
    write_config(config_dir, postgres_url, extra=cluster_yaml(prefix))
    a, b = Driver(config_dir), Driver(config_dir)
    await a.start()
    await b.start()
    try:
        yield Pair(a, b, prefix, collector)
    finally:
        await b.stop()
        await a.stop()
        await collector.stop()


async def outbox_empty(driver: Driver) -> bool:
    """True once every outbox row is published and deleted."""
    async with driver.db.session() as session:
        return (await session.execute(select(func.count(OutboxMessage.id)))).scalar_one() == 0


def uplinks_of(collector: Collector, serial: str) -> list[dict]:
    documents = [
        json.loads(m.payload) for m in collector.messages if m.topic.endswith(f"/{serial}/uplink")
    ]
    return documents


async def test_alternating_instances_publish_each_uplink_once_with_shared_counters(pair: Pair) -> None:
    serials = [f"C00000{i:02d}" for i in range(1, 7)]
    sessions = [await pair.device(serial, 40 + i) for i, serial in enumerate(serials)]

    async def run(session: DeviceSession) -> None:
        for n in range(10):
            session.port = pair.port(n)
            answer = await session.post("rx", RX)
            assert answer.code == Code.CHANGED, answer

    await asyncio.gather(*(run(session) for session in sessions))

    await pair.collector.wait_for(6 * 11)
    await pair.collector.sync()
    assert len(pair.collector.messages) == 66  # 6 joins + 60 uplinks, none twice
    async with pair.a.db.session() as session:
        assert (await session.execute(select(func.count(UplinkRecord.id)))).scalar_one() == 66
        counters = dict(
            (await session.execute(select(Device.serial, Device.uplinks_since_join))).all()
        )
        received = (
            await session.execute(
                select(Device.serial, UplinkRecord.received_at)
                .join(Device, Device.id == UplinkRecord.device_id)
                .order_by(UplinkRecord.id)
            )
        ).all()
    assert counters == {serial: 10 for serial in serials}
    for serial in serials:
        documents = uplinks_of(pair.collector, serial)
        assert sorted(d["message_type"] for d in documents) == ["join"] + ["rx"] * 10
        # Each document's last_seen is the previous uplink's time, whichever instance took it.
        times = [at for owner, at in received if owner == serial]
        assert sorted((d["last_seen"] or "") for d in documents) == sorted(
            [""] + [zulu_millis(at) for at in times[:-1]]
        )
    await wait_until(lambda: outbox_empty(pair.a), what="outbox drained")


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.queue.put_nowait(data)


async def udp_request(port: int, datagram: bytes) -> aiocoap.Message:
    """One datagram, as is, from a fresh socket (a retransmission keeps mid and token); its answer."""
    loop = asyncio.get_running_loop()
    transport, inbox = await loop.create_datagram_endpoint(_Inbox, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(datagram)
        return aiocoap.Message.decode(await asyncio.wait_for(inbox.queue.get(), 5))
    finally:
        transport.close()


async def downlink_states(driver: Driver, command_id: str) -> list[int]:
    async with driver.db.session() as session:
        query = select(DownlinkEvent.state).where(DownlinkEvent.command_id == command_id)
        return list((await session.execute(query.order_by(DownlinkEvent.id))).scalars())


@pytest.mark.parametrize("b_cached", [False, True], ids=["b-loads-device", "b-caches-device"])
async def test_a_retransmission_reaching_the_other_instance_gets_the_identical_answer(
    pair: Pair, b_cached: bool
) -> None:
    session = await pair.device("C0000102", 64)
    if b_cached:  # B's cached replay window is then older than the request
        session.port = pair.b.coap_port
        assert (await session.post("rx", RX)).code == Code.CHANGED
    await pair.a.downlinks.schedule("C0000102", "tx_interval", 30, command_id="rt-1")
    outer, request_id = session.protect("rx", RX)
    outer.mtype, outer.mid, outer.token = Type.CON, 0x1234, b"\x01\x02\x03\x04"
    datagram = outer.encode()

    first = await udp_request(pair.a.coap_port, datagram)
    again = await udp_request(pair.b.coap_port, datagram)  # the ACK was lost: retransmitted

    assert (first.mtype, first.mid, first.token) == (Type.ACK, 0x1234, b"\x01\x02\x03\x04")
    assert (again.mtype, again.mid, again.token) == (Type.ACK, 0x1234, b"\x01\x02\x03\x04")
    assert (again.code, again.opt.oscore, again.payload) == (first.code, first.opt.oscore, first.payload)
    inner, _ = session.context.unprotect(again, request_id)  # the device verifies it
    assert (inner.code, cbor2.loads(inner.payload)[4][1:]) == (Code.CHANGED, [16, 30])
    assert pair.b.refusals.counts["replay"] == 0
    await wait_until(lambda: len(uplinks_of(pair.collector, "C0000102")) >= (3 if b_cached else 2))
    await pair.collector.sync()
    assert [d["message_type"] for d in uplinks_of(pair.collector, "C0000102")] == (
        ["join", "rx", "rx"] if b_cached else ["join", "rx"]
    )
    async with pair.a.db.session() as db_session:
        stored = (await db_session.execute(select(func.count(UplinkRecord.id)))).scalar_one()
    assert stored == (3 if b_cached else 2)
    assert await downlink_states(pair.a, "rt-1") == [0, 2]  # dispatched once
    session.port = pair.b.coap_port
    assert (await session.post("rx", RX)).code == Code.CHANGED  # no re-JOIN


@pytest.mark.parametrize("b_cached", [False, True], ids=["b-loads-device", "b-caches-device"])
async def test_the_same_partial_iv_with_another_ciphertext_is_still_a_replay(
    pair: Pair, b_cached: bool
) -> None:
    session = await pair.device("C0000103", 65)
    if b_cached:
        session.port = pair.b.coap_port
        assert (await session.post("rx", RX)).code == Code.CHANGED
    seqno = session.context.sender_sequence_number
    outer, request_id = session.protect("rx", RX)
    session.port = pair.a.coap_port
    assert (await session.send_raw(outer, request_id)).code == Code.CHANGED
    session.context.sender_sequence_number = seqno  # the same Partial IV, another plaintext
    other, other_id = session.protect("rx", cbor2.dumps({1: 91, 14: 3000}))
    assert other.opt.oscore == outer.opt.oscore and other.payload != outer.payload
    session.port = pair.b.coap_port
    again = await session.send_raw(other, other_id)
    assert (again.code, again.payload) == (Code.UNAUTHORIZED, b"Replay detected")
    assert pair.b.refusals.counts["replay"] == 1


@pytest.mark.parametrize("style", ["absent", "wrapped"])
async def test_a_device_rejoined_through_one_instance_is_accepted_by_the_other(
    pair: Pair, style: str
) -> None:
    device = make_device("C0000201", 17, 61)
    await add_device(pair.a.db, pair.a.box, device)
    session = session_for(pair.a, device, kid_context_style=style)
    assert (await session.join("1.0.0", 17)).code == Code.CHANGED
    session.port = pair.b.coap_port
    assert (await session.post("rx", RX)).code == Code.CHANGED  # B caches this context
    old_context = session.context
    session.port = pair.a.coap_port
    assert (await session.join("1.0.1", 17)).code == Code.CHANGED  # a new context, made by A
    session.port = pair.b.coap_port
    assert (await session.post("rx", RX)).code == Code.CHANGED  # B notices and reloads

    stale = session_for(pair.b, device, kid_context_style=style)
    stale.context = old_context  # a request under the superseded context
    refused = await stale.post("rx", RX)
    assert refused.code in (Code.UNAUTHORIZED, Code.BAD_REQUEST)
    await pair.collector.wait_for(4)
    await pair.collector.sync()
    assert [json.loads(m.payload)["message_type"] for m in pair.collector.messages] == [
        "join", "rx", "join", "rx",
    ]


async def test_a_downlink_is_delivered_once_and_each_callback_posted_once(pair: Pair) -> None:
    posts: list[dict] = []
    arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        posts.append(await request.json())
        arrived.set()
        return web.Response()

    async with http_endpoint("/hook", receive) as port:
        session = await pair.device("C0000301", 62)
        view, _ = await pair.a.downlinks.schedule(
            "C0000301", "tx_interval", 30, command_id="cl-1", callback_url=f"http://127.0.0.1:{port}/hook"
        )
        device_id = (await pair.b.credentials.preload(session.kid)).device_id
        await wait_until(lambda: device_id in pair.b.downlinks.open_devices, what="B sees the downlink")
        session.port = pair.b.coap_port
        answer = await session.post("rx", RX)
        assert (answer.code, answer.body[4][1:], answer.body[3]) == (Code.CHANGED, [16, 30], 0)
        session.port = pair.a.coap_port
        again = await session.post("rx", RX)  # an /rx while sent: state 5, never sent again
        assert 4 not in (again.body or {})
        await wait_until(lambda: len(posts) == 3, what="three callbacks")
        assert [(p["command_id"], p["status"]) for p in posts] == [("cl-1", 0), ("cl-1", 2), ("cl-1", 5)]

        def statuses() -> list[int]:
            return [
                json.loads(m.payload)["status"]
                for m in pair.collector.messages
                if m.topic.endswith("/downlink/status")
            ]

        await wait_until(lambda: len(statuses()) >= 3, what="status topic")
        await pair.collector.sync()
        assert statuses() == [0, 2, 5]
        assert len(posts) == 3


async def test_rows_of_a_stopped_instance_are_adopted_and_leadership_moves(pair: Pair) -> None:
    # A dead instance (last heartbeat long ago) left two unpublished uplinks behind.
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    async with pair.a.db.session() as session, session.begin():
        dead = (
            await session.execute(
                insert(Instance)
                .values(name="crashed", started_at=long_ago, heartbeat_at=long_ago)
                .returning(Instance.id)
            )
        ).scalar_one()
        for n in range(2):
            await session.execute(
                insert(OutboxMessage).values(
                    serial="C0000401",
                    document=json.dumps({"serial": "C0000401", "n": n}),
                    created_at=long_ago,
                    instance_id=dead,
                )
            )
    await pair.collector.wait_for(2, timeout=20)
    await pair.collector.sync()
    assert [json.loads(m.payload)["n"] for m in pair.collector.messages] == [0, 1]
    await wait_until(lambda: outbox_empty(pair.a), what="adopted rows deleted")
    async with pair.a.db.session() as session:
        names = (await session.execute(select(Instance.name))).scalars().all()
    assert "crashed" not in names

    leader, other = (pair.a, pair.b) if pair.a.cluster.leader else (pair.b, pair.a)
    assert not other.cluster.leader
    await leader.stop()
    await wait_until(lambda: other.cluster.leader, timeout=10, what="the other instance leads")
    await leader.start()  # the fixture stops both


async def test_cluster_mode_needs_postgresql(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    write_config(config_dir, extra="cluster: true\n")
    with pytest.raises(ConfigError) as caught:
        load_configuration(config_dir, {})
    assert str(caught.value) == (
        f"{config_dir / 'configuration.yaml'}:7: cluster.enabled: several instances need a shared "
        "PostgreSQL database: set database.url to postgresql+asyncpg://user:password@host/dbname, "
        "or remove cluster"
    )


async def test_a_command_from_mqtt_is_queued_by_one_instance_only(pair: Pair) -> None:
    await pair.device("C0000501", 63)
    for driver in (pair.a, pair.b):
        mqtt = driver.integrations.running["mqtt"]
        await wait_until(lambda mqtt=mqtt: mqtt.downlink_status["subscribed"], what="command subscription")
        assert mqtt.downlink_status["subscribed"] == f"$share/coap-driver/{pair.prefix}/+/downlink"
    async with aiomqtt.Client("127.0.0.1", SYSTEM_BROKER_PORT) as client:
        for n in range(4):
            await client.publish(
                f"{pair.prefix}/C0000501/downlink",
                json.dumps({"command": "tx_interval", "parameter": 30 + n}),
                qos=1,
            )

    async def queued() -> list[int]:
        async with pair.a.db.session() as session:
            return list((await session.execute(select(Downlink.parameter).order_by(Downlink.id))).scalars())

    await wait_until(lambda: _has(queued(), 4), what="four downlinks")
    await pair.collector.sync()  # the broker has handed out everything published before
    assert sorted(await queued()) == [30, 31, 32, 33]  # each once; two instances, any order


async def _has(rows, count: int) -> bool:
    return len(await rows) >= count
