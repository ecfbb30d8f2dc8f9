"""The built-in MQTT broker: amqtt running inside the driver's own event loop.

Users who have no broker get one with zero setup; it lives and dies with the
MQTT integration, which is why it is a plain object with `start`/`stop` rather
than a separate service.
"""

from __future__ import annotations

import errno
import logging
import socket

from amqtt.broker import Broker

_LOGGER = logging.getLogger(__name__)

# amqtt and its state machine log every connection at INFO and tracebacks on
# ordinary client disconnects; the driver's log is for the driver.
for _name in ("amqtt", "transitions"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class BrokerError(Exception):
    """The built-in broker could not start; the message names the setting to change."""


class BuiltinBroker:
    """amqtt on ``host:port``, anonymous access (bound to localhost by default)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Broker | None = None

    @property
    def running(self) -> bool:
        return self._broker is not None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict:
        return {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.host}:{self.port}"},
            },
            # Only anonymous auth: no $SYS publisher, no per-packet loggers.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

    def _check_port(self) -> None:
        """Fail with a message about the setting, not an amqtt traceback."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
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
                raise self._bind_error(exc) from None

    def _bind_error(self, exc: OSError) -> BrokerError:
        if exc.errno == errno.EADDRINUSE:
            return BrokerError(
                f"mqtt.builtin_port: port {self.port} on {self.host} is already in use "
                "(another MQTT broker, e.g. Mosquitto, may be running); choose another "
                "builtin_port or use the external broker"
            )
        if exc.errno == errno.EACCES:
            return BrokerError(
                f"mqtt.builtin_port: no permission to listen on port {self.port} on {self.host}"
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return BrokerError(
                f"mqtt.builtin_host: {self.host} is not an address of this machine"
            )
        return BrokerError(
            f"mqtt.builtin_port: cannot listen on {self.host}:{self.port}: {exc.strerror}"
        )

    async def start(self) -> None:
        if self._broker is not None:
            return
        self._check_port()
        broker = Broker(self._config())
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps the OSError in its own BrokerError
            cause = exc.__cause__
            if isinstance(cause, OSError):
                raise self._bind_error(cause) from None
            raise BrokerError(f"mqtt: the built-in broker failed to start: {exc}") from exc
        self._broker = broker
        _LOGGER.info("Built-in MQTT broker listening on %s:%s", self.host, self.port)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is None:
            return
        try:
            await broker.shutdown()
        except Exception:  # stopping must always succeed from the caller's view
            _LOGGER.exception("Built-in MQTT broker did not shut down cleanly")
        _LOGGER.info("Built-in MQTT broker stopped")
