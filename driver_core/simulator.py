"""Virtual devices speaking PROTOCOL.md: the demo, the test peer and a small load generator.

Each device joins, sends three /rx about 5 minutes apart, then one every
tx_interval; answers carrying a downlink are acknowledged at once (the queue
drains in one wake-up). `time_scale` compresses time: 60 turns 5 minutes into
5 seconds. A JOIN refused or unanswered is retried at the transmission interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
from aiocoap.numbers.codes import Code

from .device_client import Answer, CoapTiming, DeviceSession, ExchangeTimeout, JoinRefused
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
            answer = await self.session.post("ack", cbor2.dumps([downlink_id, result]))


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
    ) -> None:
        self.time_scale = time_scale
        self.on_event = on_event or (lambda serial, text: _LOGGER.info("%s %s", serial, text))
        rng = random.Random(seed)
        self.devices = [
            SimulatedDevice(
                enrollment=device,
                family=families[device.hw_type],
                session=DeviceSession(
                    device.sender_id, device.master_secret, device.master_salt, host, port, timing
                ),
                rng=random.Random(rng.random()),
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
