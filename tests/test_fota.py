"""Firmware over the air end to end: real UDP, real OSCORE, real databases, simulated devices."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiocoap
import aiohttp
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from sqlalchemy import select

from driver_core.device_client import CoapTiming, DeviceSession, FirmwareDownload, exchange
from driver_core.driver import Driver
from driver_core.enrollment import DeviceInput, add_device
from driver_core.events import EVENT_FOTA_STATE
from driver_core.fota import FotaService, library, start_fota, stop_fota
from driver_core.fota.models import FirmwareUpdate
from driver_core.response_cache import ResponseCache
from driver_core.simulator import SimulatedDevice
from driver_core.storage.db import Database
from driver_core.storage.models import Device
from driver_core.storage.secretbox import SecretBox
from driver_core.timefmt import utcnow
from tests.conftest import UplinkLog, make_device, session_for, write_config

IMAGE = bytes(random.Random(7).randrange(256) for _ in range(20_000))
LOSSY = CoapTiming(ack_timeout=0.1, ack_random_factor=1.5, max_retransmit=4)


class FotaLog:
    """FOTA state events from the bus."""

    def __init__(self) -> None:
        self.events = []

    def __call__(self, event) -> None:
        self.events.append(event)

    def states(self, serial: str) -> list[str]:
        """State changes only (progress events repeat the state)."""
        states: list[str] = []
        for event in self.events:
            if event.serial == serial and (not states or states[-1] != event.state):
                states.append(event.state)
        return states


async def chunks_of(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 4096):
        yield data[start : start + 4096]


@pytest.fixture
async def fota(running_driver: Driver) -> AsyncIterator[FotaService]:
    await stop_fota(running_driver)  # the driver's own, replaced by one that flushes often
    service = await start_fota(running_driver, flush_interval=0.05)
    try:
        yield service
    finally:
        await stop_fota(running_driver)


@pytest.fixture
def fota_log(running_driver: Driver) -> FotaLog:
    log = FotaLog()
    running_driver.bus.listen(EVENT_FOTA_STATE, log)
    return log


async def publish(
    driver: Driver, service: FotaService, data: bytes = IMAGE, version: str = "2.0.0",
    hw_type: int = 17, target: bool = True,
) -> library.ImageView:
    view = await library.save_image(
        driver.db, driver.config_dir, chunks_of(data), hw_type=hw_type, version=version
    )
    if target:
        await library.set_target(driver.db, version, hw_type=hw_type)
    await service.reload()
    return view


async def joined(driver: Driver, device: DeviceInput, firmware: str = "1.0.0", **kwargs):
    await add_device(driver.db, driver.box, device)
    session = session_for(driver, device, **kwargs)
    await session.join(firmware, device.hw_type)
    return session


async def stored_update(driver: Driver, serial: str) -> FirmwareUpdate:
    await driver.fota.flush()
    async with driver.db.session() as session:
        return (
            await session.execute(
                select(FirmwareUpdate).join(Device, Device.id == FirmwareUpdate.device_id)
                .where(Device.serial == serial)
            )
        ).scalar_one()


async def get_block(session: DeviceSession, path: str, block2=None, etag=None) -> aiocoap.Message:
    request = aiocoap.Message(code=Code.GET, uri_path=path.split("/"))
    if block2 is not None:
        request.opt.block2 = block2
    if etag is not None:
        request.opt.etags = (etag,)
    inner, protected = await session.request_inner(request)
    assert protected
    return inner


# --- the full update, with loss -----------------------------------------------------------------


async def test_full_update_of_several_devices_with_20_percent_loss(
    running_driver, fota, fota_log, uplinks: UplinkLog
):
    driver = running_driver
    view = await publish(driver, fota)
    await library.save_image(  # another family's campaign runs at the same time
        driver.db, driver.config_dir, chunks_of(IMAGE[::-1]), hw_type=24, version="5.1"
    )
    await library.set_target(driver.db, "5.1", hw_type=24)
    await fota.reload()
    devices = []
    for index, hw_type in enumerate([17, 17, 17, 24, 24]):
        enrollment = make_device(f"F000000{index}", hw_type, 40 + index)
        await add_device(driver.db, driver.box, enrollment)
        session = DeviceSession(
            enrollment.sender_id, enrollment.master_secret, enrollment.master_salt,
            "127.0.0.1", driver.coap_port, LOSSY, loss=0.2,
        )
        devices.append(
            SimulatedDevice(enrollment, driver.families[hw_type], session, keep_images=True)
        )
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(device.update_firmware(checks=200) for device in devices)), 120
    )
    assert outcomes == ["installed 2.0.0"] * 3 + ["installed 5.1"] * 2
    for device in devices:
        expected = IMAGE if device.enrollment.hw_type == 17 else IMAGE[::-1]
        assert device.installed_images == [expected]
        assert fota_log.states(device.serial) == ["offered", "downloading", "downloaded", "installed"]
        row = await stored_update(driver, device.serial)
        assert (row.state, row.percent, row.received_bytes, row.from_version) == (
            "installed", 100, len(IMAGE), "1.0.0"
        )
        assert row.ranges == [[0, len(IMAGE)]]
        assert row.blocks >= 20 and row.block_size == 1024 and row.error is None
    campaign = await fota.campaign(view)
    assert campaign == {
        "offered": 0, "downloading": 0, "downloaded": 0, "installed": 3, "failed": 0,
        "targeted": 3, "up_to_date": 3,
    }
    async with driver.db.session() as session:
        firmware = dict((await session.execute(select(Device.serial, Device.firmware))).all())
    assert firmware == {"F0000000": "2.0.0", "F0000001": "2.0.0", "F0000002": "2.0.0",
                        "F0000003": "5.1", "F0000004": "5.1"}
    # POST /fota is published like every POST, with the offer it was answered with.
    offers = [u.data for u in uplinks.items if u.message_type == "fota" and u.serial == "F0000000"]
    assert offers and offers[0]["firmware"] == "1.0.0"
    assert offers[0]["offer"] == {"version": "2.0.0", "size": len(IMAGE), "sha256": view.sha256}


async def test_offer_answer_and_nothing_when_up_to_date(running_driver, fota):
    driver = running_driver
    view = await publish(driver, fota)
    session = await joined(driver, make_device("F0000010", 17, 50))
    answer = await session.post("fota", cbor2.dumps({1: "1.0.0"}))
    assert answer.code == Code.CHANGED
    assert answer.body == {5: {1: "2.0.0", 2: len(IMAGE), 3: hashlib.sha256(IMAGE).digest()}}
    assert view.sha256 == hashlib.sha256(IMAGE).hexdigest()
    current = await session.post("fota", cbor2.dumps({1: "2.0.0"}))
    assert current.code == Code.CHANGED and current.payload == b""
    # Another hw_type's target never applies; a device target beats the hw_type's.
    other = await joined(driver, make_device("F0000011", 24, 51))
    assert (await other.post("fota", cbor2.dumps({1: "1.0.0"}))).payload == b""
    await publish(driver, fota, IMAGE[:5000], version="2.0.1-beta", target=False)
    await library.set_target(driver.db, "2.0.1-beta", serial="F0000010")
    await fota.reload()
    beta = await session.post("fota", cbor2.dumps({1: "2.0.0"}))
    assert beta.body[5][1] == "2.0.1-beta" and beta.body[5][2] == 5000


async def test_firmware_check_downlink_makes_the_simulated_device_update(running_driver, fota):
    for family in {f.domain: f for f in running_driver.families.values()}.values():
        assert family.commands["firmware_check"].code == 2
    driver = running_driver
    await publish(driver, fota)
    enrollment = make_device("F0000012", 17, 52)
    await add_device(driver.db, driver.box, enrollment)
    device = SimulatedDevice(enrollment, driver.families[17], session_for(driver, enrollment))
    await device.join()
    await driver.downlinks.schedule("F0000012", "firmware_check", None, "check-1")
    await device.send_rx()
    assert device.firmware_check_requested
    assert await device.check_firmware() == "installed 2.0.0"
    assert (await driver.downlinks.get("check-1")).state == 3
    assert fota.track("F0000012").state == "installed"


# --- resume, corruption, stalls -----------------------------------------------------------------


async def test_resume_after_a_driver_restart_mid_download(tmp_path: Path):
    config_dir = tmp_path / "config"
    write_config(config_dir)
    driver = Driver(config_dir)
    await driver.start()
    try:
        service = await start_fota(driver)
        await publish(driver, service)
        enrollment = make_device("F0000020", 17, 60)
        session = await joined(driver, enrollment)
        offer = (await session.post("fota", cbor2.dumps({1: "1.0.0"}))).body[5]
        download = FirmwareDownload(session, "2.0.0", 6, sha256=offer[3], size=offer[2])
        await download.run(max_blocks=7)
        assert download.received == 7 * 1024
    finally:
        await stop_fota(driver)
        await driver.stop()
    driver = Driver(config_dir)  # a new process would do the same: nothing carried in memory
    await driver.start()
    try:
        service = await start_fota(driver)
        track = service.track("F0000020")
        assert (track.state, track.ranges, track.blocks, track.percent) == (
            "downloading", [[0, 7168]], 7, 7168 * 100 // len(IMAGE)
        )
        session.port = driver.coap_port  # the same OSCORE context: no JOIN needed
        result = await download.run()
        assert result.data == IMAGE and result.sha256 == hashlib.sha256(IMAGE).hexdigest()
        assert service.track("F0000020").state == "downloaded"
        await session.join("2.0.0", 17)
        row = await stored_update(driver, "F0000020")
        assert (row.state, row.blocks, row.received_bytes) == ("installed", 20, len(IMAGE))
    finally:
        await stop_fota(driver)
        await driver.stop()


async def test_corrupted_image_is_reported_by_the_device_and_offered_again(
    running_driver, fota, fota_log, uplinks
):
    driver = running_driver
    view = await publish(driver, fota)
    stored = library.image_path(driver.config_dir, view.sha256)
    data = bytearray(stored.read_bytes())
    data[1234] ^= 0xFF  # bit rot on the driver's disk
    stored.write_bytes(bytes(data))
    enrollment = make_device("F0000030", 17, 70)
    await add_device(driver.db, driver.box, enrollment)
    device = SimulatedDevice(
        enrollment, driver.families[17], session_for(driver, enrollment), keep_images=True
    )
    await device.join()
    outcome = await device.check_firmware()
    assert outcome.startswith("failed 2.0.0: SHA-256 ")
    assert device.firmware == "1.0.0" and device.installed_images == []
    assert fota_log.states("F0000030") == ["offered", "downloading", "downloaded", "failed"]
    row = await stored_update(driver, "F0000030")
    assert row.state == "failed"
    assert row.error.startswith("reported by the device: SHA-256 ")
    assert "differs from the offered " + view.sha256 in row.error
    report = [u for u in uplinks.items if u.message_type == "fota"][-1]
    assert report.data["firmware"] == "1.0.0" and report.data["failed_version"] == "2.0.0"
    assert report.data["reason"].startswith("SHA-256 ")
    # The next check offers it again (a fixed image would install).
    again = await device.session.post("fota", cbor2.dumps({1: "1.0.0"}))
    assert again.body[5][1] == "2.0.0"
    track = fota.track("F0000030")
    assert (track.state, track.attempts, track.error) == ("offered", 2, None)


async def test_failure_report_with_a_reason_code(running_driver, fota):
    driver = running_driver
    await publish(driver, fota)
    session = await joined(driver, make_device("F0000031", 17, 71))
    answer = await session.post("fota", cbor2.dumps({1: "1.0.0", 2: "2.0.0", 3: 7}))
    assert answer.code == Code.CHANGED and answer.payload == b""  # no offer in that answer
    track = fota.track("F0000031")
    assert (track.state, track.error) == ("failed", "7")
    bad = await session.post("fota", cbor2.dumps({1: "1.0.0", 2: 5}))
    assert bad.code == Code.BAD_REQUEST
    assert bad.payload == b"fota failure report key 2 (failed version) must be a tstr"


async def test_stalled_download_fails_then_resumes(running_driver, fota, fota_log):
    driver = running_driver
    await publish(driver, fota)
    session = await joined(driver, make_device("F0000040", 17, 80))
    download = FirmwareDownload(session, "2.0.0", 6)
    await download.run(max_blocks=5)
    assert fota.sweep_stalled(utcnow() + timedelta(minutes=29)) == 0
    assert fota.sweep_stalled(utcnow() + timedelta(minutes=31)) == 1
    row = await stored_update(driver, "F0000040")
    assert row.state == "failed"
    assert row.error == "stalled: no block for 30 minutes (25 % received)"
    await download.run()  # the device wakes up and goes on where it stopped
    track = fota.track("F0000040")
    assert (track.state, track.error, track.ranges) == ("downloaded", None, [[0, len(IMAGE)]])
    assert fota_log.states("F0000040") == ["downloading", "failed", "downloading", "downloaded"]


async def test_joining_with_the_old_version_after_download_is_a_failed_install(running_driver, fota):
    driver = running_driver
    await publish(driver, fota)
    session = await joined(driver, make_device("F0000041", 17, 81))
    await session.download("2.0.0")
    await session.join("1.0.0", 17)  # its uplink event fires before the answer is sent
    track = fota.track("F0000041")
    assert track.state == "failed"
    assert track.error == "the device joined with firmware 1.0.0 after downloading 2.0.0"


# --- Block2 -------------------------------------------------------------------------------------


async def test_block_size_negotiated_down_by_the_device(running_driver, fota):
    driver = running_driver
    view = await publish(driver, fota, IMAGE[:1000])
    session = await joined(driver, make_device("F0000050", 17, 90))
    result = await session.download("2.0.0", szx=2)
    assert (result.block_size, result.requests, result.data) == (64, 16, IMAGE[:1000])
    block = await get_block(session, "fota/2.0.0", (3, False, 2))
    assert (block.opt.block2.block_number, block.opt.block2.more, block.opt.block2.size_exponent) == (
        3, True, 2
    )
    assert block.payload == IMAGE[192:256]
    assert block.opt.size2 == 1000 and block.opt.etag == view.etag
    assert block.opt.content_format == 42
    # No Block2: block 0 of the largest size; BERT (SZX 7) is reduced to 1024-byte blocks.
    first = await get_block(session, "fota/2.0.0")
    assert tuple(first.opt.block2) == (0, False, 6) and first.payload == IMAGE[:1000]
    big = await publish(driver, fota, IMAGE, version="3.0", target=False)
    bert = await get_block(session, "fota/3.0", (1, False, 7))
    assert tuple(bert.opt.block2) == (2, True, 6) and bert.payload == IMAGE[2048:3072]
    assert bert.opt.etag == big.etag


async def test_any_block_in_any_order_from_any_address(running_driver, fota):
    driver = running_driver
    view = await publish(driver, fota)
    session = await joined(driver, make_device("F0000051", 17, 91))
    numbers = list(range(20))
    random.Random(3).shuffle(numbers)
    parts, sizes = {}, []
    for number in numbers:  # every exchange leaves from a new UDP port
        request = aiocoap.Message(code=Code.GET, uri_path=["fota", "2.0.0"], block2=(number, False, 6))
        outer, request_id = session.protect_message(request)
        response = await exchange("127.0.0.1", driver.coap_port, outer, session.timing)
        wire = aiocoap.Message(code=response.code, payload=response.payload)
        wire.mtype, wire.mid, wire.token, wire.opt = (
            response.mtype, response.mid, response.token, response.opt
        )
        sizes.append(len(wire.encode()))
        inner, _ = session.context.unprotect(response, request_id)
        assert inner.code == Code.CONTENT and inner.opt.etag == view.etag
        assert inner.opt.size2 == len(IMAGE) and inner.opt.block2.more == (number < 19)
        parts[number] = inner.payload
    assert b"".join(parts[n] for n in range(20)) == IMAGE
    assert 1024 < max(sizes) <= 1152  # PROTOCOL.md's message size limit, with 1024-byte blocks
    assert fota.track("F0000051").state == "downloaded"


async def test_unknown_version_wrong_etag_and_other_hw_type_get_4_04(running_driver, fota):
    driver = running_driver
    view = await publish(driver, fota)
    session = await joined(driver, make_device("F0000052", 17, 92))
    unknown = await get_block(session, "fota/9.9.9", (0, False, 6))
    assert (unknown.code, unknown.payload) == (Code.NOT_FOUND, b"No such firmware")
    wrong = await get_block(session, "fota/2.0.0", (1, False, 6), etag=b"\x00" * 8)
    assert (wrong.code, wrong.payload) == (Code.NOT_FOUND, b"ETag does not match")
    right = await get_block(session, "fota/2.0.0", (1, False, 6), etag=view.etag)
    assert right.code == Code.CONTENT and right.payload == IMAGE[1024:2048]
    other = await joined(driver, make_device("F0000053", 24, 93))
    assert (await get_block(other, "fota/2.0.0")).code == Code.NOT_FOUND
    post = await session.post("fota/2.0.0", b"")
    assert post.code == Code.METHOD_NOT_ALLOWED


async def test_block_past_the_end_gets_4_02(running_driver, fota):
    driver = running_driver
    await publish(driver, fota, IMAGE[:2048])
    session = await joined(driver, make_device("F0000054", 17, 94))
    last = await get_block(session, "fota/2.0.0", (1, False, 6))
    assert last.code == Code.CONTENT and last.opt.block2.more is False
    past = await get_block(session, "fota/2.0.0", (2, False, 6))
    assert past.code == Code.BAD_OPTION
    assert past.payload == b"block 2 of 1024 bytes starts at byte 2048, beyond the image's 2048 bytes"


async def test_a_missing_service_or_file_is_a_4_04_not_a_crash(running_driver, fota):
    driver = running_driver
    view = await publish(driver, fota)
    session = await joined(driver, make_device("F0000055", 17, 95))
    library.image_path(driver.config_dir, view.sha256).unlink()
    gone = await get_block(session, "fota/2.0.0")
    assert (gone.code, gone.payload) == (Code.NOT_FOUND, b"Firmware file missing")


async def test_delete_is_refused_while_a_device_downloads(running_driver, fota):
    driver = running_driver
    await publish(driver, fota)
    session = await joined(driver, make_device("F0000056", 17, 96))
    await FirmwareDownload(session, "2.0.0").run(max_blocks=2)
    with pytest.raises(library.FirmwareError) as refused:
        await fota.delete_image(17, "2.0.0")
    assert refused.value.status == 409
    assert refused.value.detail == (
        "firmware 2.0.0 for hw_type 17 is being downloaded by 1 device(s); wait until they "
        "finish or fail"
    )
    await FirmwareDownload(session, "2.0.0").run()
    deleted = await fota.delete_image(17, "2.0.0")
    assert not library.image_path(driver.config_dir, deleted.sha256).exists()
    assert await library.list_targets(driver.db) == []
    assert (await get_block(session, "fota/2.0.0")).code == Code.NOT_FOUND


# --- memory -------------------------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(400)
async def test_200_concurrent_downloads_do_not_grow_the_driver_with_image_size(tmp_path: Path):
    """A driver process serving 200 devices a 256 KiB image at once (51,200 blocks).

    Buffering per download would cost 200 x 256 KiB = 50 MiB, and aiocoap's own
    deduplication store ~175 MiB; the bound is well under the first.
    """
    count, size = 200, 256 * 1024
    config_dir = tmp_path / "config"
    url = f"sqlite+aiosqlite:///{tmp_path / 'fota.db'}"
    write_config(config_dir, url)
    db = Database(url)
    await db.start()
    box = SecretBox.load_or_create(config_dir)
    devices = []
    for index in range(count):
        device = make_device(f"G{index:07d}", 17, 0)
        device.sender_id = b"\xc0" + index.to_bytes(2, "big")
        await add_device(db, box, device)
        devices.append(device)
    image = os.urandom(size)
    await library.save_image(db, config_dir, chunks_of(image), hw_type=17, version="2.0.0")
    await db.stop()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fota_driver_process", str(config_dir),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        port = int(await asyncio.wait_for(process.stdout.readline(), 60))
        timing = CoapTiming(ack_timeout=3.0)
        sessions = [
            DeviceSession(d.sender_id, d.master_secret, d.master_salt, "127.0.0.1", port, timing)
            for d in devices
        ]
        gate = asyncio.Semaphore(50)

        async def join(session: DeviceSession) -> None:
            async with gate:
                await session.join("1.0.0", 17)

        await asyncio.gather(*(join(s) for s in sessions))
        baseline = peak = vm_rss(process.pid)
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, vm_rss(process.pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        digest = hashlib.sha256(image).digest()
        results = await asyncio.gather(
            *(s.download("2.0.0", sha256=digest, keep=False) for s in sessions)
        )
        done.set()
        await sampler
        peak = max(peak, vm_rss(process.pid))
    finally:
        process.stdin.close()
        await asyncio.wait_for(process.wait(), 60)
    assert {r.sha256 for r in results} == {digest.hex()}
    assert sum(r.requests for r in results) == count * size // 1024
    assert peak - baseline < 32 * 1024 * 1024, f"grew {(peak - baseline) / 2**20:.1f} MiB"


# --- the deduplication store --------------------------------------------------------------------


def test_response_cache_answers_duplicates_and_stays_bounded():
    now = [0.0]
    cache = ResponseCache(lifetime=60, max_bytes=3000, clock=lambda: now[0])
    first = cache.key("127.0.0.1", 1000, 1, b"t", b"\x09\x01")
    assert cache.lookup(first) == (False, None)
    assert cache.lookup(first) == (True, None)  # being handled: no answer yet
    cache.remember(first, b"x" * 1000)
    assert cache.lookup(cache.key("127.0.0.1", 1000, 1, b"t", b"\x09\x01")) == (True, b"x" * 1000)
    assert cache.lookup(cache.key("127.0.0.1", 1001, 1, b"t", b"\x09\x01")) == (False, None)  # another port
    assert cache.lookup(cache.key("127.0.0.1", 1000, 1, b"u", b"\x09\x01")) == (False, None)  # another token
    assert cache.lookup(cache.key("127.0.0.1", 1000, 1, b"t", b"\x09\x02")) == (False, None)  # another PIV
    assert cache.lookup(cache.key("127.0.0.1", 1000, 1, b"t", None)) == (False, None)  # no OSCORE
    for mid in range(2, 6):  # three answers fit the byte budget; the oldest go
        key = cache.key("127.0.0.1", 1000, mid, b"t", None)
        cache.lookup(key)
        cache.remember(key, b"y" * 1000)
    assert cache.bytes <= 3000
    assert cache.lookup(first) == (True, None)  # known, answer dropped
    now[0] = 61.0
    assert cache.lookup(first) == (False, None)  # expired: new again
    assert len(cache) == 1 and cache.bytes == 0


# --- REST API -----------------------------------------------------------------------------------

OCTETS = {"Content-Type": "application/octet-stream"}


async def test_rest_upload_list_target_status_campaign_and_delete(running_driver, fota, api):
    driver = running_driver
    reply = await api.call(
        "POST", "/firmware", data=IMAGE, headers=OCTETS,
        params={"hw_type": "17", "version": "2.0.0", "release_notes": "Faster JOIN"},
    )
    assert reply.status == 201, reply.body
    sha = hashlib.sha256(IMAGE).hexdigest()
    assert {k: v for k, v in reply.body.items() if k != "uploaded_at"} == {
        "hw_type": 17, "version": "2.0.0", "size": len(IMAGE), "sha256": sha,
        "etag": sha[:16], "release_notes": "Faster JOIN",
    }
    assert library.image_path(driver.config_dir, sha).read_bytes() == IMAGE
    assert [p.name for p in library.firmware_dir(driver.config_dir).iterdir()] == [f"{sha}.bin"]

    form = aiohttp.FormData()
    form.add_field("hw_type", "24")
    form.add_field("version", "5.1")
    form.add_field("file", IMAGE[:3000], filename="vidi-5.1.bin",
                   content_type="application/octet-stream")
    multipart = await api.call("POST", "/firmware", data=form)
    assert multipart.status == 201, multipart.body
    assert multipart.body["size"] == 3000 and multipart.body["release_notes"] is None

    listed = await api.call("GET", "/firmware")
    assert [(i["hw_type"], i["version"]) for i in listed.body["items"]] == [(17, "2.0.0"), (24, "5.1")]
    only = await api.call("GET", "/firmware", params={"hw_type": "24"})
    assert [i["version"] for i in only.body["items"]] == ["5.1"]

    target = await api.call("PUT", "/firmware-targets/hw-types/17", json={"version": "2.0.0"})
    assert target.status == 200
    assert target.body == {"scope": "hw_type", "hw_type": 17, "serial": None, "version": "2.0.0"}
    session = await joined(driver, make_device("F0000060", 17, 100))
    own = await api.call("PUT", "/devices/F0000060/firmware-target", json={"version": "2.0.0"})
    assert own.body == {"scope": "device", "hw_type": 17, "serial": "F0000060", "version": "2.0.0"}
    targets = await api.call("GET", "/firmware-targets")
    assert [t["scope"] for t in targets.body["items"]] == ["hw_type", "device"]

    offer = await session.post("fota", cbor2.dumps({1: "1.0.0"}))
    await FirmwareDownload(session, "2.0.0", 6, sha256=offer.body[5][3]).run(max_blocks=4)
    status = await api.call("GET", "/devices/F0000060/firmware")
    assert status.status == 200
    update = status.body["update"]
    assert (status.body["firmware"], status.body["target"], status.body["target_scope"]) == (
        "1.0.0", "2.0.0", "device"
    )
    assert (update["state"], update["blocks"], update["received_bytes"], update["percent"]) == (
        "downloading", 4, 4096, 20
    )
    detail = await api.call("GET", "/firmware/17/2.0.0")
    assert detail.body["campaign"] == {
        "offered": 0, "downloading": 1, "downloaded": 0, "installed": 0, "failed": 0,
        "targeted": 1, "up_to_date": 0,
    }
    refused = await api.call("DELETE", "/firmware/17/2.0.0")
    assert refused.status == 409 and refused.body["error"] == "conflict"
    await FirmwareDownload(session, "2.0.0", 6).run()
    assert (await api.call("DELETE", "/firmware/17/2.0.0")).status == 204
    assert (await api.call("GET", "/firmware/17/2.0.0")).status == 404
    assert (await api.call("GET", "/firmware-targets")).body == {"items": []}
    assert not library.image_path(driver.config_dir, sha).exists()
    assert (await get_block(session, "fota/2.0.0")).code == Code.NOT_FOUND


async def test_rest_upload_refusals(running_driver, fota, api):
    async def upload(params, data=IMAGE, headers=OCTETS):
        reply = await api.call("POST", "/firmware", data=data, headers=headers, params=params)
        return reply.status, reply.body.get("field"), reply.body.get("detail")

    good = {"hw_type": "17", "version": "2.0.0"}
    assert await upload({"hw_type": "17"}) == (400, "version", "version: required")
    assert await upload({**good, "hw_type": "99"}) == (
        400, "hw_type", "hw_type: must be one of the supported types: 14, 16, 17, 18, 23, 24, 28, "
        "29, 31",
    )
    bad = await upload({**good, "version": "../x"})
    assert bad[:2] == (400, "version") and bad[2].startswith("query parameter version: must be 1 to 32")
    assert await upload(good, data=b"") == (400, "file", "the image is empty")
    assert await upload(good, headers={"Content-Type": "text/plain"}) == (
        415, None,
        "send the image as application/octet-stream or multipart/form-data (got text/plain)",
    )
    assert (await upload(good))[0] == 201
    assert await upload(good) == (
        409, "version", "hw_type 17 already has a firmware 2.0.0; delete it first"
    )
    missing = await api.call("PUT", "/firmware-targets/hw-types/17", json={"version": "9"})
    assert (missing.status, missing.body["detail"]) == (404, "no firmware 9 for hw_type 17")
    nobody = await api.call("GET", "/devices/NOSUCH/firmware")
    assert (nobody.status, nobody.body["detail"]) == (404, "no device with serial NOSUCH")
    none = await api.call("DELETE", "/firmware-targets/hw-types/24")
    assert (none.status, none.body["detail"]) == (404, "hw_type 24 has no firmware target")
    # Nothing half-written is left behind by the refused uploads.
    assert len(list(library.firmware_dir(running_driver.config_dir).iterdir())) == 1


# --- CLI functions ------------------------------------------------------------------------------


async def test_cli_functions(running_driver, fota, tmp_path: Path):
    from driver_core.fota import cli

    driver = running_driver
    image_file = tmp_path / "fw.bin"
    image_file.write_bytes(IMAGE)
    sha = hashlib.sha256(IMAGE).hexdigest()
    assert await cli.upload_firmware(
        driver.db, driver.config_dir, image_file, hw_type=17, version="2.0.0",
        hw_types=driver.families.keys(),
    ) == f"uploaded 2.0.0 for hw_type 17: 20000 bytes, sha256 {sha}"
    with pytest.raises(cli.FirmwareError) as refused:
        await cli.upload_firmware(driver.db, driver.config_dir, image_file, hw_type=99,
                                  version="2.0.0", hw_types=driver.families.keys())
    assert refused.value.detail == "hw_type must be one of: 14, 16, 17, 18, 23, 24, 28, 29, 31"
    with pytest.raises(cli.FirmwareError) as missing:
        await cli.upload_firmware(driver.db, driver.config_dir, tmp_path / "none", hw_type=17,
                                  version="2.0.1")
    assert missing.value.detail == f"{tmp_path / 'none'}: no such file"
    assert await cli.set_firmware_target(driver.db, "2.0.0", hw_type=17) == (
        "hw_type 17: firmware target is now 2.0.0"
    )
    listing = await cli.list_firmware(driver.db)
    assert len(listing) == 2 and listing[1].split()[:4] == ["17", "2.0.0", "20000", sha[:16]]
    assert listing[1].endswith(" hw_type")
    await fota.reload_if_changed()  # what the running driver does every poll interval
    session = await joined(driver, make_device("F0000070", 17, 110))
    await session.post("fota", cbor2.dumps({1: "1.0.0"}))
    await fota.flush()
    status = await cli.firmware_status(driver.db, serial="F0000070")
    assert status == [
        "F0000070: firmware 1.0.0, target 2.0.0 (hw_type)",
        "update 2.0.0: offered, 0 % (0/20000 bytes, 0 blocks), last block -",
    ]
    campaign = await cli.firmware_status(driver.db, hw_type=17, version="2.0.0")
    assert campaign[0].split() == ["offered", "1"] and campaign[-1].split() == ["up_to_date", "0"]
    assert await cli.set_firmware_target(driver.db, None, hw_type=17) == (
        "hw_type 17: no firmware target any more"
    )
    assert await cli.delete_firmware(driver.db, driver.config_dir, 17, "2.0.0") == (
        "deleted 2.0.0 for hw_type 17"
    )


async def test_update_bookkeeping_on_each_database(db_url: str, tmp_path: Path):
    """The tracking rows, campaign counts and delete refusal on SQLite and on PostgreSQL."""
    config_dir = tmp_path / "pg-config"
    write_config(config_dir, db_url)
    driver = Driver(config_dir)
    await driver.start()
    try:
        service = await start_fota(driver)
        view = await publish(driver, service)
        first = await joined(driver, make_device("F0000080", 17, 120))
        second = await joined(driver, make_device("F0000081", 17, 121))
        await first.post("fota", cbor2.dumps({1: "1.0.0"}))
        await FirmwareDownload(second, "2.0.0").run(max_blocks=3)
        await service.flush()
        with pytest.raises(library.FirmwareError):
            await library.delete_image(driver.db, driver.config_dir, 17, "2.0.0")
        assert await library.campaign_counts(driver.db, view) == {
            "offered": 1, "downloading": 1, "downloaded": 0, "installed": 0, "failed": 0,
            "targeted": 2, "up_to_date": 0,
        }
        await FirmwareDownload(second, "2.0.0").run()
        await second.join("2.0.0", 17)
        await service.flush()
        status = await library.device_status(driver.db, "F0000081")
        assert (status["firmware"], status["update"]["state"]) == ("2.0.0", "installed")
        assert status["update"]["received_bytes"] == len(IMAGE)
        assert (await library.campaign_counts(driver.db, view))["up_to_date"] == 1
    finally:
        await stop_fota(driver)
        await driver.stop()
