"""Real MQTT parts for tests: private Mosquitto processes, TLS material, a subscriber.

Also a minimal driver core (real EventBus + a real driver_core Database) that
commits an uplink document the way the core does before announcing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from driver_core.events import EVENT_UPLINK, EventBus
from driver_core.storage.models import OutboxMessage
from driver_core.timefmt import utcnow
from driver_core.uplink import Uplink

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SYSTEM_BROKER_PORT = 1883


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` (only for states that have no event to await)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# ---- TLS material ---------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )


def make_tls_files(directory: Path) -> TlsFiles:
    """A private CA and a server certificate for 127.0.0.1 / localhost."""
    import ipaddress

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coap-driver test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, files.server_key)
    return files


def client_tls_context(tls: TlsFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls.ca_cert))


# ---- a private Mosquitto --------------------------------------------------------


class Mosquitto:
    """`mosquitto -c <generated conf>` on 127.0.0.1:`port`; restartable on the same port."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        tls: TlsFiles | None = None,
        persistence: bool = False,
        options: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.tls = tls
        self.persistence = persistence
        self.options = options  # more mosquitto.conf lines, e.g. "max_queued_messages 0"
        self.log: list[str] = []
        self._process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def _config(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "user root",  # read the key files written by the test (root-only tmp dirs)
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",  # "... running" is an information line
        ]
        if self.tls:
            lines += [
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
            ]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.directory}/"]
        lines += self.options
        return "\n".join(lines) + "\n"

    async def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        conf.write_text(self._config())
        self._process = await asyncio.create_subprocess_exec(
            MOSQUITTO, "-c", str(conf),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        running = asyncio.get_running_loop().create_future()
        self._drain = asyncio.create_task(self._read_log(self._process, running))
        try:
            async with asyncio.timeout(timeout):
                await running  # mosquitto logs "... running" once it listens
        except BaseException:
            await self.stop()
            raise

    async def _read_log(self, process: asyncio.subprocess.Process, running: asyncio.Future) -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            if " running" in line and not running.done():
                running.set_result(None)
        if not running.done():
            running.set_exception(RuntimeError("mosquitto exited:\n" + "\n".join(self.log)))

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._drain is not None:
            await asyncio.gather(self._drain, return_exceptions=True)
            self._drain = None

    async def __aenter__(self) -> Mosquitto:
        """`async with Mosquitto(...) as broker:` runs it for the block (stopped even on failure)."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


# ---- a subscriber ---------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    # The packet id the broker delivered it with: a broker resending an unacknowledged
    # delivery to a persistent session uses the same one (tests/test_faults.py).
    mid: int = 0


@dataclass
class Collector:
    """Subscribes to `topic_filter` and records every message, in arrival order.

    With `persistent=True` the session survives broker restarts (clean_session
    off, fixed client id) and the collector reconnects by itself, so messages
    queued by the broker while it was away are received too.
    """

    port: int
    topic_filter: str = "#"
    qos: int = 1
    tls: TlsFiles | None = None
    persistent: bool = False
    client_id: str | None = None
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None
        self._arrived = asyncio.Event()
        self._client_now: aiomqtt.Client | None = None
        self._sync_topic = f"collector-sync/{uuid.uuid4().hex}"
        self._synced = asyncio.Event()

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            identifier=self.client_id,
            clean_session=False if self.persistent else None,
            tls_context=client_tls_context(self.tls) if self.tls else None,
        )

    async def start(self) -> Collector:
        self._subscribed = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(10):
            await asyncio.shield(self._subscribed)
        return self

    async def _run(self) -> None:
        assert self._subscribed is not None
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe(self.topic_filter, qos=self.qos)
                    await client.subscribe(self._sync_topic, qos=1)
                    self._client_now = client
                    if not self._subscribed.done():
                        self._subscribed.set_result(None)
                    async for message in client.messages:
                        if str(message.topic) == self._sync_topic:
                            self._synced.set()
                            continue
                        payload = message.payload
                        if isinstance(payload, str):
                            payload = payload.encode()
                        self.messages.append(
                            Received(
                                str(message.topic), bytes(payload or b""), message.retain,
                                message.mid,
                            )
                        )
                        self._arrived.set()
            except aiomqtt.MqttError as exc:
                self._client_now = None
                if not self.persistent:
                    if not self._subscribed.done():
                        self._subscribed.set_exception(exc)
                    raise
            await asyncio.sleep(0.1)  # the broker is away: try again (no event to await)

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """The first `count` messages, once they have arrived."""
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.messages[:count]

    async def sync(self) -> None:
        """Return once the broker has processed our acknowledgements of what arrived so far.

        A broker handles one connection's packets in order, so our own message
        coming back means every PUBACK sent before it was processed: a broker
        stopped after this will not deliver those messages again.
        """
        assert self._client_now is not None, "not connected"
        self._synced.clear()
        await self._client_now.publish(self._sync_topic, b"sync", qos=1)
        async with asyncio.timeout(10):
            await self._synced.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
            self._task = None


async def retained(port: int, topic: str, tls: TlsFiles | None = None) -> bytes:
    """The retained payload of `topic` right now (a fresh subscriber gets it at once)."""
    collector = await Collector(port, topic, tls=tls).start()
    try:
        return (await collector.wait_for(1, timeout=5))[0].payload
    finally:
        await collector.stop()


# ---- a minimal driver core ------------------------------------------------------


async def outbox_count(db: Any) -> int:
    async with db.session() as session:
        return int((await session.execute(select(func.count(OutboxMessage.id)))).scalar_one())


class Core:
    """The parts of the driver core the MQTT integration sees: bus, db, config_dir."""

    def __init__(self, db: Any, config_dir: Path) -> None:
        self.bus = EventBus()
        self.db = db
        self.config_dir = config_dir

    async def commit_uplink(
        self, serial: str, data: dict[str, Any], *, hw_type: int = 17, announce: bool = True
    ) -> tuple[Uplink, bytes]:
        """Store the document in the outbox (as the core does), then fire the uplink event.

        Returns the uplink and the exact payload expected on MQTT.
        """
        now = utcnow()
        uplink = Uplink(
            serial=serial,
            hw_type=hw_type,
            message_type="rx",
            rx_date=now,
            join_date=now - dt.timedelta(days=1),
            last_seen=now - dt.timedelta(hours=1),
            data=data,
        )
        document = json.dumps(uplink.document(), separators=(",", ":"))
        async with self.db.session() as session:
            row = OutboxMessage(serial=serial, document=document, created_at=now)
            session.add(row)
            await session.commit()
            uplink.outbox_id = row.id
        if announce:
            self.bus.fire(EVENT_UPLINK, uplink)
        return uplink, document.encode()


@contextlib.asynccontextmanager
async def integration_starter(async_setup: Any):
    """`start(core, **settings)` sets an integration up; all are unloaded on exit (fixture helper)."""
    running: list[Any] = []

    async def start(core: Any, **settings: Any) -> Any:
        integration = await async_setup(core, settings)
        running.append(integration)
        return integration

    try:
        yield start
    finally:
        for integration in running:
            await integration.async_unload()
