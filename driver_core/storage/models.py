"""Database tables. Every schema change comes with an Alembic migration."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both SQLite (which forgets the zone) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    # Named constraints keep later migrations (SQLite batch mode included) predictable.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Device(Base):
    """An enrolled device. Secrets are Fernet tokens, never plaintext."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    serial: Mapped[str] = mapped_column(String(16), unique=True, nullable=False)
    hw_type: Mapped[int] = mapped_column(Integer, nullable=False)
    kid: Mapped[bytes] = mapped_column(LargeBinary(7), unique=True, nullable=False)
    master_secret_enc: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    master_salt_enc: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    join_date: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime)
    firmware: Mapped[str | None] = mapped_column(String(64))
    tx_interval: Mapped[int] = mapped_column(Integer, nullable=False, default=60)
    uplinks_since_join: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class SecurityContext(Base):
    """The one current OSCORE context of a device (RFC 8613 B.2 result).

    Keys are re-derived from the device secrets and `id_context`; only the
    counters that make replays impossible across restarts are stored.
    """

    __tablename__ = "security_contexts"

    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    id_context: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)
    r2_issued_ms: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sender_seq_reserved: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    replay_index: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    replay_bitfield: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    established_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # Cluster mode (driver_core.shared_answers): the last request committed under this
    # context (its sequence number, a SHA-256 of its OSCORE option and ciphertext) and
    # its protected answer, so any instance answers a retransmission with the same bytes.
    answered_seqno: Mapped[int | None] = mapped_column(BigInteger)
    answered_request: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    answer: Mapped[bytes | None] = mapped_column(LargeBinary)


class UplinkRecord(Base):
    """Uplink history: what the device sent and what it decoded to."""

    __tablename__ = "uplinks"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), nullable=False, index=True
    )
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    message_type: Mapped[str] = mapped_column(String(16), nullable=False)
    payload: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)


class OutboxMessage(Base):
    """Uplink documents not yet acknowledged by the MQTT broker, in arrival order.

    The topic is rendered at publish time, so a topic change also applies to
    what is still waiting.
    """

    __tablename__ = "mqtt_outbox"
    __table_args__ = {"sqlite_autoincrement": True}  # ids are never reused: order depends on them

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    serial: Mapped[str] = mapped_column(String(16), nullable=False)
    document: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # The instance that publishes the row (cluster mode); NULL with a single instance.
    instance_id: Mapped[int | None] = mapped_column(Integer, index=True)


class Instance(Base):
    """A running driver instance sharing this database (cluster mode), with its heartbeat."""

    __tablename__ = "instances"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class IntegrationSettings(Base):
    """Settings saved for an integration (web panel, CLI); override configuration.yaml."""

    __tablename__ = "integration_settings"

    domain: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class Downlink(Base):
    """A command or configuration queued for a device; `state` follows the documented codes 0-5."""

    __tablename__ = "downlinks"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    command_id: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), nullable=False
    )
    command: Mapped[str] = mapped_column(String(64), nullable=False)
    code: Mapped[int] = mapped_column(Integer, nullable=False)
    parameter: Mapped[Any] = mapped_column(JSON, nullable=False)
    state: Mapped[int] = mapped_column(Integer, nullable=False, index=True)
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    result: Mapped[int | None] = mapped_column(Integer)  # the device's ack result code
    inserted_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # state 3 or 4
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    unacknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # state 5
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)

    __table_args__ = (
        Index("ix_downlinks_device_id_state", "device_id", "state"),
        {"sqlite_autoincrement": True},  # the wire id derives from the row id
    )


class DownlinkEvent(Base):
    """Every state change of a downlink, in order; the callbacks integration delivers from here."""

    __tablename__ = "downlink_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    downlink_id: Mapped[int] = mapped_column(
        ForeignKey("downlinks.id", ondelete="CASCADE"), nullable=False, index=True
    )
    command_id: Mapped[str] = mapped_column(String(128), nullable=False)
    serial: Mapped[str] = mapped_column(String(16), nullable=False)
    state: Mapped[int] = mapped_column(Integer, nullable=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    # Callback delivery: pending (NULL), "delivered", or "failed" after the retry budget.
    callback_status: Mapped[str | None] = mapped_column(String(16), index=True)
    callback_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    callback_error: Mapped[str | None] = mapped_column(Text)
    # Published on the MQTT downlink status topic and acknowledged by the broker.
    mqtt_sent: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, index=True)


class ApiToken(Base):
    """A REST API bearer token; only its SHA-256 is stored (the token is shown once)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class User(Base):
    """A web panel user; the password is stored as an scrypt hash (driver_core/web/passwords.py)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


# The web panel sorts the device list by these columns, one page at a time (100,000 devices).
Index("ix_devices_hw_type", Device.hw_type)
Index("ix_devices_name", Device.name)
Index("ix_devices_join_date", Device.join_date)
Index("ix_devices_last_seen", Device.last_seen)

# The firmware tables live with the firmware service; importing them here keeps
# Base.metadata (and Alembic's comparison with the migrations) complete.
from driver_core.fota import models as _firmware_models  # noqa: E402, F401
