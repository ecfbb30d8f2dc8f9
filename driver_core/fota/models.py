"""Firmware tables: images (files live on disk, rows only describe them), targets, per-device updates.

Kept next to the FOTA code; they share the one `Base` so Alembic (migration
0005) and the schema comparison see them like every other table.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from driver_core.storage.models import Base, UTCDateTime

VERSION_MAX = 32


class FirmwareImage(Base):
    """One uploaded image for one hw_type; the bytes are `<config_dir>/firmware/<sha256>.bin`."""

    __tablename__ = "firmware_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hw_type: Mapped[int] = mapped_column(Integer, nullable=False)
    version: Mapped[str] = mapped_column(String(VERSION_MAX), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False, index=True)  # hex
    release_notes: Mapped[str | None] = mapped_column(Text)
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (
        UniqueConstraint("hw_type", "version", name="uq_firmware_images_hw_type_version"),
    )


class FirmwareTarget(Base):
    """The image a hw_type (all its devices) or one device should run; the device's wins."""

    __tablename__ = "firmware_targets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(
        ForeignKey("firmware_images.id", ondelete="CASCADE"), nullable=False, index=True
    )
    hw_type: Mapped[int | None] = mapped_column(Integer, unique=True)
    device_id: Mapped[int | None] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), unique=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class FirmwareUpdate(Base):
    """A device's latest firmware update: offered, downloading, downloaded, installed or failed."""

    __tablename__ = "firmware_updates"

    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int | None] = mapped_column(
        ForeignKey("firmware_images.id", ondelete="SET NULL"), index=True
    )
    version: Mapped[str] = mapped_column(String(VERSION_MAX), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    from_version: Mapped[str | None] = mapped_column(String(64))
    block_size: Mapped[int | None] = mapped_column(Integer)
    blocks: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    received_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    percent: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # Byte ranges [start, end) served at least once: blocks come in any order.
    ranges: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    offered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_block_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
