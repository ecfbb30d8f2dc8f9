"""Virtual devices speaking PROTOCOL.md: the demo, the test peer and a small load generator.

Each device joins, sends three /rx about 5 minutes apart, then one every
tx_interval; answers carrying a downlink are acknowledged at once (the queue
drains in one wake-up). `time_scale` compresses time: 60 turns 5 minutes into
5 seconds. A JOIN refused or unanswered is retried at the transmission interval.

Firmware: with `check_firmware` a device asks POST /fota after every JOIN (and
after a `firmware_check` downlink), downloads an offered image block by block
(GET /fota/<version>, resuming where it stopped when the link fails), verifies
it and "installs" it: the next JOIN reports the new version. An image that
does not verify is reported with POST /fota {1: current, 2: version, 3: reason}.
`loss` drops that fraction of datagrams; every exchange leaves from a new port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
from aiocoap.numbers.codes import Code

from .device_client import (
    Answer,
    CoapTiming,
    DeviceSession,
    DownloadError,
    ExchangeTimeout,
    FirmwareDownload,
    ImageMismatch,
    JoinRefused,
)
from .enrollment import DeviceInput
from .family import Family

_LOGGER = logging.getLogger(__name__)
FIRST_INTERVAL_MINUTES = 5
FIRST_TRANSMISSIONS = 3


@dataclass
class SimulatedDevice:
    enrollment: DeviceInput
    family: Family
    session: DeviceSession
    firmware: str = "1.0.0"
    rng: random.Random = field(default_factory=random.Random)
    # Downlink command codes this device refuses (acked with result 1).
    refuse_codes: set[int] = field(default_factory=set)
    received_downlinks: list[list[Any]] = field(default_factory=list)
    fota_szx: int = 6  # block size the device asks for (6: 1024 bytes)
    keep_images: bool = False  # keep downloaded images in memory (tests); else hash only
    firmware_check_requested: bool = False  # a firmware_check downlink arrived
    installed_images: list[bytes] = field(default_factory=list)
    _download: FirmwareDownload | None = None

    @property
    def serial(self) -> str:
        return self.enrollment.serial

    async def join(self) -> Answer:
        return await self.session.join(self.firmware, self.enrollment.hw_type, reset_cause=1)

    async def send_rx(self) -> Answer:
        values = self.family.sample_values(self.enrollment.hw_type, self.rng)
        payload = self.family.encode(self.enrollment.hw_type, values)
        answer = await self.session.post("rx", payload)
        await self.handle_downlinks(answer)
        return answer

    async def handle_downlinks(self, answer: Answer) -> None:
        """Acknowledge every downlink an answer carries; an /ack answer may carry the next."""
        while answer.protected and 4 in answer.body:
            downlink = answer.body[4]
            self.received_downlinks.append(downlink)
            downlink_id, code = downlink[0], downlink[1]
            result = 1 if code in self.refuse_codes else 0
            check = self.family.commands.get("firmware_check")
            if result == 0 and check is not None and code == check.code:
                self.firmware_check_requested = True
            answer = await self.session.post("ack", cbor2.dumps([downlink_id, result]))

    async def check_firmware(self, retries: int = 8) -> str:
        """POST /fota, then download, verify and install an offered image.

        Returns what happened: ``up to date``, ``installed <v>``, ``failed <v>: <why>``
        or ``interrupted <v>`` (the link failed; the next check resumes the download).
        ExchangeTimeout of the check itself passes through.
        """
        self.firmware_check_requested = False
        answer = await self.session.post("fota", cbor2.dumps({1: self.firmware}))
        await self.handle_downlinks(answer)
        if not answer.protected:  # the driver lost or replaced our context
            self.session.context = None
            return f"interrupted: {answer.code}, joining again"
        offer = answer.body.get(5) if answer.code == Code.CHANGED else None
        if not offer:
            return "up to date"
        version, size, digest = offer[1], offer[2], offer[3]
        download = self._download
        if download is None or download.version != version or download.expected_sha256 != digest:
            download = FirmwareDownload(
                self.session, version, self.fota_szx, sha256=digest, size=size, keep=self.keep_images
            )
            self._download = download
        try:
            result = await download.run(retries=retries)
        except ImageMismatch as exc:
            self._download = None
            await self.report_failure(version, str(exc))
            return f"failed {version}: {exc}"
        except DownloadError as exc:
            if not exc.protected:
                self.session.context = None  # join again, then resume
                return f"interrupted {version}: {exc}"
            self._download = None  # e.g. 4.04: the image was replaced; start over next time
            return f"failed {version}: {exc}"
        except ExchangeTimeout:
            return f"interrupted {version}"
        self._download = None
        if result.data is not None:
            self.installed_images.append(result.data)
        self.firmware = version
        self.session.context = None  # reboot into the new image: a new JOIN reports it
        with contextlib.suppress(ExchangeTimeout, JoinRefused):  # else it joins again later
            await self.join()
        return f"installed {version}"

    async def report_failure(self, version: str, reason: str) -> Answer:
        payload = cbor2.dumps({1: self.firmware, 2: version, 3: reason[:200]})
        return await self.session.post("fota", payload)

    async def update_firmware(self, checks: int = 50) -> str:
        """Check (and join again when needed) until installed, up to date or failed."""
        outcome = "not checked"
        for _ in range(checks):
            try:
                if self.session.context is None:
                    await self.join()
                if outcome.startswith("installed"):
                    return outcome
                outcome = await self.check_firmware()
            except (ExchangeTimeout, JoinRefused):
                continue
            if not outcome.startswith("interrupted") and self.session.context is not None:
                return outcome
        return outcome


class Simulator:
    def __init__(
        self,
        devices: list[DeviceInput],
        families: dict[int, Family],
        host: str,
        port: int,
        time_scale: float = 1.0,
        timing: CoapTiming | None = None,
        on_event: Callable[[str, str], None] | None = None,
        seed: int | None = None,
        loss: float = 0.0,
        check_firmware: bool = False,
        fota_szx: int = 6,
    ) -> None:
        self.time_scale = time_scale
        self.check_firmware = check_firmware
        self.on_event = on_event or (lambda serial, text: _LOGGER.info("%s %s", serial, text))
        rng = random.Random(seed)
        self.devices = [
            SimulatedDevice(
                enrollment=device,
                family=families[device.hw_type],
                session=DeviceSession(
                    device.sender_id, device.master_secret, device.master_salt, host, port, timing,
                    loss=loss,
                ),
                rng=random.Random(rng.random()),
                fota_szx=fota_szx,
            )
            for device in devices
        ]

    def _minutes(self, minutes: float) -> float:
        return minutes * 60 / self.time_scale

    async def run_device(self, device: SimulatedDevice, transmissions: int | None = None) -> None:
        """Run one device's life: JOIN, then rx forever (or `transmissions` times)."""
        tx_interval = 60
        sent = 0
        while True:
            try:
                answer = await device.join()
                tx_interval = int(answer.body.get(1, tx_interval))
                self.on_event(device.serial, f"joined (tx_interval {tx_interval} min)")
                await device.handle_downlinks(answer)
                if self.check_firmware:
                    device.firmware_check_requested = True
                break
            except (JoinRefused, ExchangeTimeout) as exc:
                self.on_event(device.serial, f"join failed: {exc}; retrying")
                await asyncio.sleep(self._minutes(tx_interval))
        while transmissions is None or sent < transmissions:
            interval = FIRST_INTERVAL_MINUTES if sent < FIRST_TRANSMISSIONS else tx_interval
            if sent:
                await asyncio.sleep(self._minutes(interval))
            try:
                answer = await device.send_rx()
            except ExchangeTimeout as exc:
                self.on_event(device.serial, f"rx lost: {exc}")
                continue
            sent += 1
            if not answer.protected and answer.code == Code.UNAUTHORIZED:
                self.on_event(device.serial, "context refused: joining again")
                await device.join()
                continue
            self.on_event(device.serial, f"rx answered {answer.code}")
            if device.firmware_check_requested:
                try:
                    outcome = await device.check_firmware()
                except ExchangeTimeout as exc:
                    outcome = f"firmware check lost: {exc}"
                self.on_event(device.serial, f"firmware: {outcome}")

    async def run(self, transmissions: int | None = None) -> None:
        # Spread the start a little, like devices powered on one after another.
        async def staggered(device: SimulatedDevice, delay: float) -> None:
            await asyncio.sleep(delay)
            await self.run_device(device, transmissions)

        await asyncio.gather(
            *(staggered(d, i * 0.05) for i, d in enumerate(self.devices))
        )


def demo_devices(count: int, hw_types: list[int]) -> list[DeviceInput]:
    """Fresh random credentials for `count` devices cycling through `hw_types`."""
    return [
        DeviceInput(
            serial=f"D{index + 1:07d}",
            hw_type=hw_types[index % len(hw_types)],
            sender_id=os.urandom(4),
            master_secret=os.urandom(16),
            master_salt=os.urandom(8),
        )
        for index in range(count)
    ]
