"""The firmware library: image files on disk, their rows, targets and per-device update rows.

Used by the REST API, the CLI and the FOTA service alike. Image bytes never
enter the database: they are `<config_dir>/firmware/<sha256>.bin`, written
while streaming the upload (hashing as it goes), so the rows the hot path
reads stay small and an image of any size costs no memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from driver_core.errors import RequestRefused
from driver_core.permissions import open_private, private_dir
from driver_core.storage.db import Database
from driver_core.storage.models import Device
from driver_core.timefmt import utcnow, zulu_millis

from .models import VERSION_MAX, FirmwareImage, FirmwareTarget, FirmwareUpdate

FIRMWARE_DIR = "firmware"
MAX_IMAGE_BYTES = 16 * 1024 * 1024  # NB-IoT modules take a few hundred KiB; 16 MiB is plenty
RELEASE_NOTES_MAX = 4000
VERSION_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._+-]{{0,{VERSION_MAX - 1}}}$"
_VERSION = re.compile(VERSION_PATTERN)

OFFERED, DOWNLOADING, DOWNLOADED, INSTALLED, FAILED = (
    "offered", "downloading", "downloaded", "installed", "failed",
)
STATES = (OFFERED, DOWNLOADING, DOWNLOADED, INSTALLED, FAILED)


class FirmwareError(RequestRefused):
    """A firmware request that cannot be honoured."""


def firmware_dir(config_dir: Path) -> Path:
    return Path(config_dir) / FIRMWARE_DIR


def image_path(config_dir: Path, sha256: str) -> Path:
    return firmware_dir(config_dir) / f"{sha256}.bin"


def check_version(version: Any, field: str = "version") -> str:
    """A version usable as one Uri-Path segment: 1-32 of A-Z a-z 0-9 . _ + - (first alphanumeric)."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise FirmwareError(
            400, "invalid_field",
            f"{field}: must be 1 to {VERSION_MAX} characters of A-Z a-z 0-9 . _ + - "
            "starting with a letter or digit",
            field,
        )
    return version


@dataclass(slots=True)
class ImageView:
    """An image as the API, the CLI and the service see it."""

    id: int
    hw_type: int
    version: str
    size: int
    sha256: str
    release_notes: str | None
    uploaded_at: datetime

    @classmethod
    def from_row(cls, row: FirmwareImage) -> ImageView:
        return cls(
            row.id, row.hw_type, row.version, row.size, row.sha256, row.release_notes,
            row.uploaded_at,
        )

    @property
    def etag(self) -> bytes:
        """The CoAP ETag of the image: the first 8 bytes of its SHA-256."""
        return bytes.fromhex(self.sha256)[:8]

    def as_json(self) -> dict[str, Any]:
        return {
            "hw_type": self.hw_type,
            "version": self.version,
            "size": self.size,
            "sha256": self.sha256,
            "etag": self.etag.hex(),
            "release_notes": self.release_notes,
            "uploaded_at": zulu_millis(self.uploaded_at),
        }


@dataclass(slots=True)
class TargetView:
    hw_type: int | None
    serial: str | None
    image: ImageView

    def as_json(self) -> dict[str, Any]:
        return {
            "scope": "hw_type" if self.serial is None else "device",
            "hw_type": self.image.hw_type,
            "serial": self.serial,
            "version": self.image.version,
        }


# --- images ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Received:
    """An uploaded image on disk, not yet in the library (a temporary file)."""

    path: Path
    sha256: str
    size: int

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def receive_image(
    config_dir: Path, chunks: AsyncIterable[bytes], max_bytes: int = MAX_IMAGE_BYTES
) -> Received:
    """Stream `chunks` to a temporary file next to the library, hashing on the way.

    Raises FirmwareError 413 beyond `max_bytes`, 400 for an empty image.
    """
    directory = firmware_dir(config_dir)
    private_dir(directory)
    partial = directory / f".upload-{uuid.uuid4().hex}"
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(open_private(partial), "wb") as out:  # owner-only, as the library
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise FirmwareError(
                        413, "payload_too_large", f"the image is larger than {max_bytes} bytes"
                    )
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size == 0:
            raise FirmwareError(400, "empty_image", "the image is empty", "file")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    return Received(partial, digest.hexdigest(), size)


def check_release_notes(release_notes: str | None) -> str | None:
    if release_notes is not None and len(release_notes) > RELEASE_NOTES_MAX:
        raise FirmwareError(
            400, "invalid_field", f"release_notes: at most {RELEASE_NOTES_MAX} characters",
            "release_notes",
        )
    return release_notes or None


async def add_image(
    db: Database,
    config_dir: Path,
    received: Received,
    *,
    hw_type: int,
    version: str,
    release_notes: str | None = None,
) -> ImageView:
    """Move a received image into the library and add its row (409 if the version exists)."""
    try:
        check_version(version)
        release_notes = check_release_notes(release_notes)
        if await get_image(db, hw_type, version) is not None:
            raise exists_error(hw_type, version)
        final = image_path(config_dir, received.sha256)
        if not final.exists():  # else: the same bytes are there under another hw_type or version
            received.path.replace(final)
        async with db.session() as session, session.begin():
            row = FirmwareImage(
                hw_type=hw_type,
                version=version,
                size=received.size,
                sha256=received.sha256,
                release_notes=release_notes,
                uploaded_at=utcnow(),
            )
            session.add(row)
            try:
                await session.flush()
            except IntegrityError:
                raise exists_error(hw_type, version) from None
            return ImageView.from_row(row)
    finally:
        received.discard()


async def save_image(
    db: Database,
    config_dir: Path,
    chunks: AsyncIterable[bytes],
    *,
    hw_type: int,
    version: str,
    release_notes: str | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> ImageView:
    """Stream `chunks` into the library as (hw_type, version); SHA-256 computed on the way.

    Raises FirmwareError: 409 when (hw_type, version) exists, 413 beyond
    `max_bytes`, 400 for an empty image or a bad version / release notes.
    """
    check_version(version)
    check_release_notes(release_notes)
    if await get_image(db, hw_type, version) is not None:
        raise exists_error(hw_type, version)
    received = await receive_image(config_dir, chunks, max_bytes)
    return await add_image(
        db, config_dir, received, hw_type=hw_type, version=version, release_notes=release_notes
    )


def exists_error(hw_type: int, version: str) -> FirmwareError:
    return FirmwareError(
        409, "conflict", f"hw_type {hw_type} already has a firmware {version}; delete it first",
        "version",
    )


async def save_image_file(
    db: Database, config_dir: Path, path: Path, *, hw_type: int, version: str,
    release_notes: str | None = None,
) -> ImageView:
    """`save_image` from a file (the CLI)."""

    async def read() -> AsyncIterable[bytes]:
        source = await asyncio.to_thread(Path(path).open, "rb")
        try:
            while chunk := await asyncio.to_thread(source.read, 65536):
                yield chunk
        finally:
            source.close()

    return await save_image(
        db, config_dir, read(), hw_type=hw_type, version=version, release_notes=release_notes
    )


async def list_images(db: Database, hw_type: int | None = None) -> list[ImageView]:
    query = select(FirmwareImage).order_by(FirmwareImage.hw_type, FirmwareImage.uploaded_at)
    if hw_type is not None:
        query = query.where(FirmwareImage.hw_type == hw_type)
    async with db.session() as session:
        return [ImageView.from_row(row) for row in (await session.execute(query)).scalars()]


async def get_image(db: Database, hw_type: int, version: str) -> ImageView | None:
    async with db.session() as session:
        row = (
            await session.execute(
                select(FirmwareImage).where(
                    FirmwareImage.hw_type == hw_type, FirmwareImage.version == version
                )
            )
        ).scalar_one_or_none()
    return ImageView.from_row(row) if row is not None else None


async def require_image(db: Database, hw_type: int, version: str) -> ImageView:
    image = await get_image(db, hw_type, version)
    if image is None:
        raise FirmwareError(404, "not_found", f"no firmware {version} for hw_type {hw_type}")
    return image


async def delete_image(
    db: Database, config_dir: Path, hw_type: int, version: str, busy: set[int] | None = None
) -> ImageView:
    """Delete the image (and its targets); 409 while a device is downloading it.

    `busy`: image ids the running service knows to be downloading (its memory
    is ahead of the rows by up to one flush interval).
    """
    image = await require_image(db, hw_type, version)
    async with db.session() as session, session.begin():
        downloading = (
            await session.execute(
                select(func.count()).select_from(FirmwareUpdate).where(
                    FirmwareUpdate.image_id == image.id, FirmwareUpdate.state == DOWNLOADING
                )
            )
        ).scalar_one()
        if downloading or (busy is not None and image.id in busy):
            raise FirmwareError(
                409, "conflict",
                f"firmware {version} for hw_type {hw_type} is being downloaded by "
                f"{max(downloading, 1)} device(s); wait until they finish or fail",
            )
        await session.execute(delete(FirmwareImage).where(FirmwareImage.id == image.id))
        shared = (
            await session.execute(
                select(func.count()).select_from(FirmwareImage).where(
                    FirmwareImage.sha256 == image.sha256
                )
            )
        ).scalar_one()
    if not shared:
        with contextlib.suppress(FileNotFoundError):
            image_path(config_dir, image.sha256).unlink()
    return image


# --- targets -----------------------------------------------------------------------------------


async def device_row(db: Database, serial: str) -> Device:
    async with db.session() as session:
        device = (
            await session.execute(select(Device).where(Device.serial == serial))
        ).scalar_one_or_none()
    if device is None:
        raise FirmwareError(404, "not_found", f"no device with serial {serial}")
    return device


async def set_target(
    db: Database, version: str, *, hw_type: int | None = None, serial: str | None = None
) -> TargetView:
    """Make `version` the target of every device of `hw_type`, or of the device `serial`."""
    if (hw_type is None) == (serial is None):
        raise ValueError("give exactly one of hw_type and serial")
    device = await device_row(db, serial) if serial is not None else None
    image_hw_type = device.hw_type if device is not None else hw_type
    assert image_hw_type is not None
    image = await require_image(db, image_hw_type, version)
    async with db.session() as session, session.begin():
        if device is not None:
            await session.execute(delete(FirmwareTarget).where(FirmwareTarget.device_id == device.id))
        else:
            await session.execute(delete(FirmwareTarget).where(FirmwareTarget.hw_type == hw_type))
        session.add(
            FirmwareTarget(
                image_id=image.id,
                hw_type=None if device is not None else hw_type,
                device_id=device.id if device is not None else None,
                created_at=utcnow(),
            )
        )
    return TargetView(None if device else hw_type, serial, image)


async def clear_target(
    db: Database, *, hw_type: int | None = None, serial: str | None = None
) -> bool:
    """Remove a target; False when there was none."""
    if (hw_type is None) == (serial is None):
        raise ValueError("give exactly one of hw_type and serial")
    async with db.session() as session, session.begin():
        if serial is not None:
            device = (
                await session.execute(select(Device.id).where(Device.serial == serial))
            ).scalar_one_or_none()
            if device is None:
                raise FirmwareError(404, "not_found", f"no device with serial {serial}")
            result = await session.execute(
                delete(FirmwareTarget).where(FirmwareTarget.device_id == device)
            )
        else:
            result = await session.execute(
                delete(FirmwareTarget).where(FirmwareTarget.hw_type == hw_type)
            )
    return bool(result.rowcount)


async def list_targets(db: Database) -> list[TargetView]:
    async with db.session() as session:
        rows = (
            await session.execute(
                select(FirmwareTarget, FirmwareImage, Device.serial)
                .join(FirmwareImage, FirmwareImage.id == FirmwareTarget.image_id)
                .outerjoin(Device, Device.id == FirmwareTarget.device_id)
                .order_by(FirmwareTarget.hw_type.is_(None), FirmwareTarget.hw_type, Device.serial)
            )
        ).all()
    return [TargetView(t.hw_type, serial, ImageView.from_row(image)) for t, image, serial in rows]


# --- campaign and per-device status ------------------------------------------------------------


async def campaign_counts(db: Database, image: ImageView) -> dict[str, int]:
    """How many devices are in each state for `image`, plus those targeted and up to date.

    `targeted`: devices whose target (own, else their hw_type's) is this image;
    `up_to_date`: those of them already reporting its version.
    """
    async with db.session() as session:
        by_state = dict(
            (
                await session.execute(
                    select(FirmwareUpdate.state, func.count())
                    .where(FirmwareUpdate.image_id == image.id)
                    .group_by(FirmwareUpdate.state)
                )
            ).all()
        )
        own = select(FirmwareTarget.device_id).where(FirmwareTarget.device_id.is_not(None))
        targeted_devices = select(Device.id, Device.firmware).where(
            Device.hw_type == image.hw_type,
            (
                Device.id.in_(
                    select(FirmwareTarget.device_id).where(FirmwareTarget.image_id == image.id)
                )
            )
            | (
                Device.id.not_in(own)
                & select(FirmwareTarget.id)
                .where(FirmwareTarget.hw_type == image.hw_type, FirmwareTarget.image_id == image.id)
                .exists()
            ),
        ).subquery()
        targeted, up_to_date = (
            await session.execute(
                select(
                    func.count(),
                    func.count().filter(targeted_devices.c.firmware == image.version),
                ).select_from(targeted_devices)
            )
        ).one()
    counts = {state: int(by_state.get(state, 0)) for state in STATES}
    counts["targeted"] = int(targeted)
    counts["up_to_date"] = int(up_to_date)
    return counts


def update_json(row: FirmwareUpdate | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "version": row.version,
        "state": row.state,
        "from_version": row.from_version,
        "size": row.size,
        "block_size": row.block_size,
        "blocks": row.blocks,
        "received_bytes": row.received_bytes,
        "percent": row.percent,
        "attempts": row.attempts,
        "offered_at": zulu_millis(row.offered_at),
        "started_at": zulu_millis(row.started_at),
        "last_block_at": zulu_millis(row.last_block_at),
        "finished_at": zulu_millis(row.finished_at),
        "error": row.error,
    }


async def device_status(db: Database, serial: str) -> dict[str, Any]:
    """Current firmware, target and the latest update of one device (stored rows)."""
    device = await device_row(db, serial)
    async with db.session() as session:
        update = await session.get(FirmwareUpdate, device.id)
        own = (
            await session.execute(
                select(FirmwareImage)
                .join(FirmwareTarget, FirmwareTarget.image_id == FirmwareImage.id)
                .where(FirmwareTarget.device_id == device.id)
            )
        ).scalar_one_or_none()
        family_target = (
            await session.execute(
                select(FirmwareImage)
                .join(FirmwareTarget, FirmwareTarget.image_id == FirmwareImage.id)
                .where(FirmwareTarget.hw_type == device.hw_type)
            )
        ).scalar_one_or_none()
    target = own or family_target
    return {
        "serial": device.serial,
        "hw_type": device.hw_type,
        "firmware": device.firmware,
        "target": target.version if target is not None else None,
        "target_scope": "device" if own is not None else ("hw_type" if target else None),
        "update": update_json(update),
    }
