"""The FOTA service: offers, block accounting, install detection, stalls, status events.

The CoAP handlers call it synchronously (dictionary lookups, no I/O) so every
answer stays piggybacked. Images and targets are cached and refreshed when
they change (through the API at once, through the CLI or another process
within `poll_interval`). Per-device update progress lives in memory and is
written in batches every `flush_interval` through the database's single
writer, so 200 devices fetching a block each per second cost one small
transaction per second, not 200.

States of a device's update: offered -> downloading -> downloaded ->
installed; failed from any of the first three (the device reported a hash
mismatch, no block came for `stall_after`, or it joined with another version
after downloading). A failed update is offered again on the next check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from driver_core.events import EVENT_FOTA_STATE, EVENT_UPLINK
from driver_core.storage.models import Device
from driver_core.tasks import cancel_and_wait
from driver_core.timefmt import utcnow, zulu_millis

from ..storage.health import log_retry
from . import library
from .blockwise import Block, BlockRequest, read_block
from .library import (
    DOWNLOADED,
    DOWNLOADING,
    FAILED,
    INSTALLED,
    OFFERED,
    ImageView,
    image_path,
)
from .models import FirmwareImage, FirmwareTarget, FirmwareUpdate

if TYPE_CHECKING:
    from driver_core.events import EventBus
    from driver_core.security import DeviceState
    from driver_core.storage.db import Database
    from driver_core.uplink import Uplink

_LOGGER = logging.getLogger(__name__)
PROGRESS_STEP = 10  # percent between two progress events of a download
ERROR_MAX = 300


@dataclass(slots=True)
class CachedImage:
    """What the hot path needs about an image."""

    view: ImageView
    path: Path
    digest: bytes
    etag: bytes

    @property
    def id(self) -> int:
        return self.view.id

    @property
    def version(self) -> str:
        return self.view.version

    @property
    def size(self) -> int:
        return self.view.size

    def offer(self) -> dict[int, Any]:
        """Answer key 5 of POST /fota."""
        return {1: self.view.version, 2: self.view.size, 3: self.digest}


@dataclass(slots=True)
class FotaStateEvent:
    """Fired on the bus (EVENT_FOTA_STATE) when an update changes state or progresses."""

    serial: str
    hw_type: int
    version: str
    state: str
    previous_state: str | None
    percent: int
    blocks: int
    received_bytes: int
    size: int
    error: str | None
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "hw_type": self.hw_type,
            "version": self.version,
            "state": self.state,
            "previous_state": self.previous_state,
            "percent": self.percent,
            "blocks": self.blocks,
            "received_bytes": self.received_bytes,
            "size": self.size,
            "error": self.error,
            "at": zulu_millis(self.at),
        }


@dataclass(slots=True, eq=False)
class Track:
    """A device's current update, in memory (the `firmware_updates` row it is flushed to)."""

    device_id: int
    serial: str
    hw_type: int
    image_id: int | None
    version: str
    size: int
    state: str
    from_version: str | None = None
    block_size: int | None = None
    blocks: int = 0
    ranges: list[list[int]] = field(default_factory=list)
    received_bytes: int = 0
    percent: int = 0
    attempts: int = 1
    offered_at: datetime | None = None
    started_at: datetime | None = None
    last_block_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    error: str | None = None

    def row_values(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "image_id": self.image_id,
            "version": self.version,
            "size": self.size,
            "state": self.state,
            "from_version": self.from_version,
            "block_size": self.block_size,
            "blocks": self.blocks,
            "received_bytes": self.received_bytes,
            "percent": self.percent,
            "ranges": [list(r) for r in self.ranges],
            "attempts": self.attempts,
            "offered_at": self.offered_at,
            "started_at": self.started_at,
            "last_block_at": self.last_block_at,
            "finished_at": self.finished_at,
            "updated_at": self.updated_at or utcnow(),
            "error": self.error,
        }

    @classmethod
    def from_row(cls, row: FirmwareUpdate, serial: str, hw_type: int) -> Track:
        return cls(
            device_id=row.device_id, serial=serial, hw_type=hw_type, image_id=row.image_id,
            version=row.version, size=row.size, state=row.state, from_version=row.from_version,
            block_size=row.block_size, blocks=row.blocks,
            ranges=[list(r) for r in row.ranges or []], received_bytes=row.received_bytes,
            percent=row.percent, attempts=row.attempts, offered_at=row.offered_at,
            started_at=row.started_at, last_block_at=row.last_block_at,
            finished_at=row.finished_at, updated_at=row.updated_at, error=row.error,
        )

    def as_json(self) -> dict[str, Any]:
        values = self.row_values()
        for key in ("device_id", "image_id", "ranges", "updated_at"):
            values.pop(key)
        for key in ("offered_at", "started_at", "last_block_at", "finished_at"):
            values[key] = zulu_millis(values[key])
        return values


def add_range(ranges: list[list[int]], start: int, end: int) -> list[list[int]]:
    """Merge [start, end) into sorted, disjoint ranges (usually one: downloads go in order)."""
    merged: list[list[int]] = []
    placed = False
    for low, high in ranges:
        if high < start:
            merged.append([low, high])
        elif end < low:
            if not placed:
                merged.append([start, end])
                placed = True
            merged.append([low, high])
        else:
            start, end = min(start, low), max(end, high)
    if not placed:
        merged.append([start, end])
    merged.sort()
    return merged


class FotaService:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        config_dir: Path,
        *,
        stall_after: timedelta = timedelta(minutes=30),
        flush_interval: float = 1.0,
        poll_interval: float = 5.0,
    ) -> None:
        self.db = db
        self.bus = bus
        self.config_dir = Path(config_dir)
        self.stall_after = stall_after
        self.flush_interval = flush_interval
        self.poll_interval = poll_interval
        self._images: dict[int, CachedImage] = {}
        self._by_key: dict[tuple[int, str], CachedImage] = {}
        self._hw_targets: dict[int, int] = {}  # hw_type -> image id
        self._device_targets: dict[int, int] = {}  # device id -> image id
        self._tracks: dict[int, Track] = {}  # device id -> its update
        self._by_serial: dict[str, Track] = {}
        self._dirty: set[int] = set()
        self._flush_lock = asyncio.Lock()  # see flush()
        self._fds: dict[int, int] = {}
        self._stamp: tuple[Any, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self._unlisten: Any = None

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.reload()
        await self._load_tracks()
        self._unlisten = self.bus.listen(EVENT_UPLINK, self._on_uplink)
        self._task = asyncio.create_task(self._run(), name="fota-service")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        await self.flush()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    async def _run(self) -> None:
        next_poll = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                self.sweep_stalled()
                await self.flush()
                if loop.time() >= next_poll:
                    next_poll = loop.time() + self.poll_interval
                    await self.reload_if_changed()
            except Exception as exc:  # the database may be away for a while; try again next round
                log_retry(_LOGGER, "FOTA bookkeeping", exc)

    # -- images and targets --------------------------------------------------------------------
    async def _current_stamp(self) -> tuple[Any, ...]:
        async with self.db.session() as session:
            images = (await session.execute(
                select(func.count(), func.max(FirmwareImage.id))
            )).one()
            targets = (await session.execute(
                select(func.count(), func.max(FirmwareTarget.id))
            )).one()
        return (*images, *targets)

    async def reload_if_changed(self) -> bool:
        """Pick up images and targets changed by another process (CLI, another instance)."""
        if await self._current_stamp() == self._stamp:
            return False
        await self.reload()
        return True

    async def reload(self) -> None:
        """Read images and targets again (after a change through the API)."""
        stamp = await self._current_stamp()
        async with self.db.session() as session:
            rows = (await session.execute(select(FirmwareImage))).scalars().all()
            targets = (await session.execute(select(FirmwareTarget))).scalars().all()
        images: dict[int, CachedImage] = {}
        for row in rows:
            view = ImageView.from_row(row)
            images[row.id] = CachedImage(
                view, image_path(self.config_dir, row.sha256), bytes.fromhex(row.sha256), view.etag
            )
        self._images = images
        self._by_key = {(i.view.hw_type, i.version): i for i in images.values()}
        self._hw_targets = {t.hw_type: t.image_id for t in targets if t.hw_type is not None}
        self._device_targets = {t.device_id: t.image_id for t in targets if t.device_id is not None}
        for image_id in [i for i in self._fds if i not in images]:
            os.close(self._fds.pop(image_id))
        for track in self._tracks.values():
            if track.image_id is not None and track.image_id not in images:
                track.image_id = None  # deleted: the row keeps version and state
        self._stamp = stamp

    async def _load_tracks(self) -> None:
        """Updates not finished yet (installed ones stay in the database only)."""
        async with self.db.session() as session:
            rows = (
                await session.execute(
                    select(FirmwareUpdate, Device.serial, Device.hw_type)
                    .join(Device, Device.id == FirmwareUpdate.device_id)
                    .where(FirmwareUpdate.state != INSTALLED)
                )
            ).all()
        for row, serial, hw_type in rows:
            self._remember(Track.from_row(row, serial, hw_type))

    def _remember(self, track: Track) -> None:
        old = self._tracks.get(track.device_id)
        if old is not None:
            self._by_serial.pop(old.serial, None)
        self._tracks[track.device_id] = track
        self._by_serial[track.serial] = track

    def image(self, hw_type: int, version: str) -> CachedImage | None:
        return self._by_key.get((hw_type, version))

    def target_for(self, state: DeviceState) -> CachedImage | None:
        """The device's own target, else its hw_type's (images of another hw_type never apply)."""
        image_id = self._device_targets.get(state.device_id)
        if image_id is None:
            image_id = self._hw_targets.get(state.hw_type)
        image = self._images.get(image_id) if image_id is not None else None
        if image is None or image.view.hw_type != state.hw_type:
            return None
        return image

    def downloading_images(self) -> set[int]:
        return {
            t.image_id for t in self._tracks.values()
            if t.state == DOWNLOADING and t.image_id is not None
        }

    def track(self, serial: str) -> Track | None:
        return self._by_serial.get(serial)

    # -- the CoAP path (synchronous) -----------------------------------------------------------
    def check(self, state: DeviceState, data: dict[str, Any]) -> CachedImage | None:
        """POST /fota: record a failure report, notice an install, return the image to offer."""
        now = utcnow()
        firmware = data.get("firmware")
        track = self._tracks.get(state.device_id)
        failed_version = data.get("failed_version")
        if failed_version is not None:
            reason = str(data.get("reason", "no reason given"))[:ERROR_MAX]
            if track is None or track.version != failed_version:
                image = self.image(state.hw_type, failed_version)
                if image is None:
                    return None
                track = self._new_track(state, image, FAILED, now, firmware, error=reason)
            elif track.state != INSTALLED:
                self._transition(track, FAILED, now, error=f"reported by the device: {reason}")
            return None  # never offer in the answer to a failure report: no loop
        if track is not None and firmware == track.version and track.state != INSTALLED:
            self._transition(track, INSTALLED, now)
        target = self.target_for(state)
        if target is None or target.version == firmware:
            return None
        if (
            track is None
            or track.version != target.version
            or track.image_id != target.id
            or track.state == INSTALLED
        ):
            self._new_track(state, target, OFFERED, now, firmware)
        elif track.state == FAILED:
            track.attempts += 1
            track.offered_at = now
            self._transition(track, OFFERED, now)
        return target

    def read(self, image: CachedImage, request: BlockRequest) -> Block:
        """One block of `image` (BlockOutOfRange past the end, OSError if the file is gone)."""
        fd = self._fds.get(image.id)
        if fd is None:
            fd = os.open(image.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fds[image.id] = fd
        return read_block(fd, image.size, request)

    def block_served(self, state: DeviceState, image: CachedImage, block: Block) -> None:
        """Account one served block: progress, and downloading/downloaded transitions."""
        now = utcnow()
        track = self._tracks.get(state.device_id)
        if track is None or track.image_id != image.id or track.version != image.version:
            track = self._new_track(state, image, DOWNLOADING, now, state.firmware)
            track.started_at = now
        elif track.state in (OFFERED, FAILED, INSTALLED):
            if track.state == INSTALLED:  # a new download of the same image: start over
                track.ranges, track.blocks, track.finished_at = [], 0, None
            track.started_at = track.started_at or now
            self._transition(track, DOWNLOADING, now)
        start = block.request.start
        track.ranges = add_range(track.ranges, start, start + len(block.payload))
        track.blocks += 1
        track.block_size = block.request.size
        track.last_block_at = now
        track.updated_at = now
        before = track.percent
        track.received_bytes = sum(high - low for low, high in track.ranges)
        track.percent = track.received_bytes * 100 // track.size if track.size else 100
        self._dirty.add(track.device_id)
        if track.state == DOWNLOADING and track.received_bytes >= track.size:
            track.finished_at = now
            self._transition(track, DOWNLOADED, now)
        elif track.percent // PROGRESS_STEP != before // PROGRESS_STEP:
            self._fire(track, track.state, now)

    # -- transitions ---------------------------------------------------------------------------
    def _new_track(
        self,
        state: DeviceState,
        image: CachedImage,
        new_state: str,
        now: datetime,
        from_version: str | None,
        error: str | None = None,
    ) -> Track:
        previous = self._tracks.get(state.device_id)
        track = Track(
            device_id=state.device_id,
            serial=state.serial,
            hw_type=state.hw_type,
            image_id=image.id,
            version=image.version,
            size=image.size,
            state=new_state,
            from_version=from_version,
            offered_at=now if new_state == OFFERED else None,
            finished_at=now if new_state == FAILED else None,
            updated_at=now,
            error=error,
        )
        self._remember(track)
        self._dirty.add(track.device_id)
        prior = previous.state if previous is not None and previous.version == track.version else None
        self._fire(track, prior, now)
        return track

    def _transition(self, track: Track, new_state: str, now: datetime, error: str | None = None) -> None:
        previous = track.state
        track.state = new_state
        track.updated_at = now
        track.error = error[:ERROR_MAX] if error else None
        if new_state in (INSTALLED, FAILED):
            track.finished_at = now
        self._dirty.add(track.device_id)
        self._fire(track, previous, now)
        log = _LOGGER.warning if new_state == FAILED else _LOGGER.info
        log("Firmware %s for %s: %s -> %s%s", track.version, track.serial, previous, new_state,
            f" ({track.error})" if track.error else "")

    def _fire(self, track: Track, previous: str | None, now: datetime) -> None:
        self.bus.fire(
            EVENT_FOTA_STATE,
            FotaStateEvent(
                serial=track.serial, hw_type=track.hw_type, version=track.version,
                state=track.state, previous_state=previous, percent=track.percent,
                blocks=track.blocks, received_bytes=track.received_bytes, size=track.size,
                error=track.error, at=now,
            ),
        )

    def _on_uplink(self, uplink: Uplink) -> None:
        """A JOIN tells the firmware the device now runs: installed, or a failed install."""
        if uplink.message_type != "join":
            return
        track = self._by_serial.get(uplink.serial)
        if track is None or track.state == INSTALLED:
            return
        firmware = uplink.data.get("firmware")
        now = utcnow()
        if firmware == track.version:
            self._transition(track, INSTALLED, now)
        elif track.state == DOWNLOADED:
            self._transition(
                track, FAILED, now,
                error=f"the device joined with firmware {firmware} after downloading {track.version}",
            )

    def sweep_stalled(self, now: datetime | None = None) -> int:
        """Downloads without a block for `stall_after` -> failed."""
        now = now or utcnow()
        limit = now - self.stall_after
        stalled = [
            t for t in self._tracks.values()
            if t.state == DOWNLOADING and t.last_block_at is not None and t.last_block_at < limit
        ]
        minutes = self.stall_after.total_seconds() / 60
        for track in stalled:
            self._transition(
                track, FAILED, now, error=f"stalled: no block for {minutes:g} minutes "
                f"({track.percent} % received)",
            )
        return len(stalled)

    # -- persistence ---------------------------------------------------------------------------
    async def flush(self) -> None:
        """Write the changed updates (one transaction through the database's writer).

        Flushes take turns: a caller that finds nothing dirty because the periodic
        flush has just taken it still returns only once that write is committed.
        """
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        if not self._dirty:
            return
        ids, self._dirty = self._dirty, set()
        values = [self._tracks[i].row_values() for i in ids if i in self._tracks]
        try:
            await self.db.run_write(lambda session: _upsert(session, values))
        except IntegrityError:
            for single in values:  # a device deleted meanwhile must not block the others
                try:
                    await self.db.run_write(lambda session, v=single: _upsert(session, [v]))
                except IntegrityError as exc:
                    _LOGGER.warning(
                        "Dropping firmware update of device %s: %s", single["device_id"], exc
                    )
                    track = self._tracks.pop(single["device_id"], None)
                    if track is not None:
                        self._by_serial.pop(track.serial, None)
        except Exception:
            self._dirty |= ids  # the database is away: keep everything for the next round
            raise
        for device_id in ids:  # installed and written: forget it
            track = self._tracks.get(device_id)
            if track is not None and track.state == INSTALLED and device_id not in self._dirty:
                del self._tracks[device_id]
                self._by_serial.pop(track.serial, None)

    # -- management (REST API) -----------------------------------------------------------------
    async def device_status(self, serial: str) -> dict[str, Any]:
        status = await library.device_status(self.db, serial)
        track = self._by_serial.get(serial)
        if track is not None:
            status["update"] = track.as_json()
        return status

    async def campaign(self, image: ImageView) -> dict[str, int]:
        await self.flush()
        return await library.campaign_counts(self.db, image)

    async def delete_image(self, hw_type: int, version: str) -> ImageView:
        await self.flush()
        image = await library.delete_image(
            self.db, self.config_dir, hw_type, version, busy=self.downloading_images()
        )
        await self.reload()
        return image


def _upsert(session: Session, rows: list[dict[str, Any]]) -> None:
    for values in rows:
        result = session.execute(
            update(FirmwareUpdate)
            .where(FirmwareUpdate.device_id == values["device_id"])
            .values(**values)
        )
        if result.rowcount == 0:
            session.execute(insert(FirmwareUpdate).values(**values))


async def start_fota(driver: Any, **options: Any) -> FotaService:
    """Create and start the service of a started driver; idempotent (returns the running one)."""
    service = getattr(driver, "fota", None)
    if isinstance(service, FotaService):
        return service
    service = FotaService(driver.db, driver.bus, driver.config_dir, **options)
    await service.start()
    driver.fota = service
    if driver.coap is not None:
        driver.coap.fota = service
    return service


async def stop_fota(driver: Any) -> None:
    """Stop the driver's service (before the database closes); idempotent."""
    service = getattr(driver, "fota", None)
    if isinstance(service, FotaService):
        driver.fota = None
        if getattr(driver, "coap", None) is not None:
            driver.coap.fota = None
        with contextlib.suppress(asyncio.CancelledError):
            await service.stop()
