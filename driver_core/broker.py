"""The built-in MQTT broker: amqtt running inside the driver's own event loop.

Users who have no broker get one with zero setup; it lives and dies with the
MQTT integration, which is why it is a plain object with `start`/`stop` rather
than a separate service.

It is never an open relay: every connection and every publish goes through a
`BrokerAccess` policy (driver_core/broker_access.py). Without credentials it
only accepts anonymous clients on a loopback address; an optional second
listener speaks TLS with the operator's certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from dataclasses import dataclass

from amqtt.broker import Broker

from .broker_access import ROLE_DRIVER, BrokerAccess, CredentialsError, is_loopback

_LOGGER = logging.getLogger(__name__)

# amqtt and its state machine log every connection at INFO and tracebacks on
# ordinary client disconnects; the driver's log is for the driver.
for _name in ("amqtt", "transitions"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class BrokerError(Exception):
    """The built-in broker could not start; the message names the setting to change."""


CREDENTIALS_CHECK_S = 2.0  # how soon a rotated password disconnects the old sessions


@dataclass(frozen=True, slots=True)
class TlsListener:
    """A TLS listener on the broker's host with the operator's certificate and key (PEM)."""

    port: int
    certfile: str
    keyfile: str


class BuiltinBroker:
    """amqtt on ``host:port`` (and ``tls.port``), access decided by ``access``.

    Without ``access`` anonymous clients on a loopback address may do anything
    (a bare broker for tests); a non-loopback host then refuses to start. The
    MQTT integration always passes the policy built from its settings.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        access: BrokerAccess | None = None,
        tls: TlsListener | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.access = access or BrokerAccess(None, allow_anonymous=True, anonymous_role=ROLE_DRIVER)
        self.tls = tls
        self._broker: Broker | None = None
        self._watcher: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._broker is not None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict:
        listeners: dict = {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}}
        if self.tls is not None:
            listeners["tls"] = {
                "type": "tcp",
                "bind": f"{self.host}:{self.tls.port}",
                "ssl": True,
                "certfile": self.tls.certfile,
                "keyfile": self.tls.keyfile,
            }
        # Our own access plugins only: no $SYS publisher, no per-packet loggers.
        return {
            "listeners": listeners,
            "plugins": {
                "driver_core.broker_plugins.DriverAuthPlugin": {"access": self.access},
                "driver_core.broker_plugins.DriverTopicPlugin": {"access": self.access},
            },
        }

    def _check_access(self) -> None:
        if self.access.allow_anonymous and not is_loopback(self.host):
            raise BrokerError(
                f"mqtt.builtin_host: {self.host} is reachable from other machines, so the "
                "built-in broker requires authentication (anonymous access is only for "
                "127.0.0.1 / ::1)"
            )

    def _check_tls(self) -> None:
        if self.tls is None:
            return
        if self.tls.port == self.port:
            raise BrokerError(
                f"mqtt.builtin_tls_port: {self.tls.port} is also the plain builtin_port; "
                "choose another port (e.g. 8883)"
            )
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls.certfile, self.tls.keyfile)
        except FileNotFoundError as exc:
            raise BrokerError(
                f"mqtt.builtin_tls_certfile/keyfile: file not found: {exc.filename}"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(
                f"mqtt.builtin_tls_certfile/keyfile: cannot load the certificate "
                f"{self.tls.certfile} with key {self.tls.keyfile}: {exc}"
            ) from None

    def _check_port(self, port: int, setting: str = "builtin_port") -> None:
        """Fail with a message about the setting, not an amqtt traceback."""
        try:
            infos = socket.getaddrinfo(self.host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise BrokerError(
                f"mqtt.builtin_host: cannot resolve {self.host!r} ({exc.strerror})"
            ) from None
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise self._bind_error(exc, port, setting) from None

    def _bind_error(
        self, exc: OSError, port: int | None = None, setting: str = "builtin_port"
    ) -> BrokerError:
        port = self.port if port is None else port
        if exc.errno == errno.EADDRINUSE:
            return BrokerError(
                f"mqtt.{setting}: port {port} on {self.host} is already in use "
                "(another MQTT broker, e.g. Mosquitto, may be running); choose another "
                f"{setting} or use the external broker"
            )
        if exc.errno == errno.EACCES:
            return BrokerError(
                f"mqtt.{setting}: no permission to listen on port {port} on {self.host}"
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return BrokerError(
                f"mqtt.builtin_host: {self.host} is not an address of this machine"
            )
        return BrokerError(
            f"mqtt.{setting}: cannot listen on {self.host}:{port}: {exc.strerror}"
        )

    async def start(self) -> None:
        if self._broker is not None:
            return
        self._check_port(self.port)
        self._check_access()
        if self.tls is not None:
            self._check_tls()
            self._check_port(self.tls.port, "builtin_tls_port")
        if self.access.store is not None:
            try:
                self.access.store.load()  # a damaged file fails before any listener opens
            except CredentialsError as exc:
                raise BrokerError(f"mqtt: {exc}") from None
        broker = Broker(self._config())
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps the OSError in its own BrokerError
            cause = exc.__cause__
            if isinstance(cause, OSError):
                raise self._bind_error(cause) from None
            raise BrokerError(f"mqtt: the built-in broker failed to start: {exc}") from exc
        self._broker = broker
        if self.access.store is not None:
            self.access.changed_users()  # the snapshot later changes are compared with
            self._watcher = asyncio.create_task(self._watch_credentials(), name="broker-credentials")
        _LOGGER.info(
            "Built-in MQTT broker listening on %s:%s%s (%s)",
            self.host,
            self.port,
            f" and TLS on {self.tls.port}" if self.tls else "",
            "anonymous clients allowed" if self.access.allow_anonymous else "authentication required",
        )

    async def _watch_credentials(self) -> None:
        """Apply a rotation made by the CLI: sessions of changed users must log in again."""
        while True:
            await asyncio.sleep(CREDENTIALS_CHECK_S)  # a file has no event to await
            changed = self.access.changed_users()
            if changed:
                await self.disconnect_users(changed)

    async def disconnect_users(self, usernames: set[str]) -> int:
        """Close the connections of these users (after a password change); returns how many."""
        broker = self._broker
        if broker is None:
            return 0
        closed = 0
        for session, handler in list(broker._sessions.values()):
            if session.username in usernames and session.transitions.is_connected():
                with contextlib.suppress(Exception):
                    await handler.handle_connection_closed()
                    closed += 1
        if closed:
            _LOGGER.info("MQTT broker: closed %d session(s) of users with a new password", closed)
        return closed

    async def stop(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        broker, self._broker = self._broker, None
        if broker is None:
            return
        try:
            await broker.shutdown()
        except Exception:  # stopping must always succeed from the caller's view
            _LOGGER.exception("Built-in MQTT broker did not shut down cleanly")
        _LOGGER.info("Built-in MQTT broker stopped")
