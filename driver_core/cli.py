"""`coap-driver`: run the driver, enroll devices, simulate devices, change integration settings.

Every expected failure (bad configuration, unreachable database, taken port,
bad CSV row) ends with one clear line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import socket
import sys
from pathlib import Path
from typing import Any

from . import __version__, logs, ops_cli, runtime
from .components import ComponentError
from .config import ConfigError
from .device_client import CoapTiming
from .driver import Driver, StartupError, load_components
from .enrollment import (
    EnrollmentError,
    add_device,
    delete_device,
    import_csv,
    list_devices,
    parse_device,
    read_devices_csv,
    write_devices_csv,
)
from .family import FamilyError
from .fota import cli as firmware_cli
from .fota.library import FirmwareError
from .integrations import SettingsError
from .simulator import Simulator, demo_devices
from .storage.db import DatabaseError
from .storage.secretbox import SecretBoxError
from .tasks import cancel_and_wait
from .tokens import TokenError, create_token, list_tokens, revoke_token
from .web.users import UserError
from .web.users_cli import create_user, delete_user, list_users

EXPECTED_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    ComponentError,
    FamilyError,
    DatabaseError,
    SecretBoxError,
    EnrollmentError,
    SettingsError,
    StartupError,
    TokenError,
    UserError,
    FirmwareError,
    *ops_cli.ERRORS,
)
DEMO_CSV = "demo-devices.csv"
DEMO_HW_TYPES = [17, 24, 28]  # one device of each family
DEMO_FALLBACK_PORT = 1884  # the demo broker's port when 1883 is taken (by Mosquitto, say)


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions", "aiosqlite", "sqlalchemy.engine", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _broker_error_types() -> tuple[type[Exception], ...]:
    try:
        from .broker import BrokerError
    except ImportError:  # pragma: no cover
        return ()
    return (BrokerError,)


def _apply_log_levels(driver: Driver) -> None:
    """The `logger:` section: output format (text or JSON lines) and levels per component."""
    assert driver.config is not None
    logs.configure(driver.config.logger)


# --- commands ---------------------------------------------------------------------------


async def cmd_run(args: argparse.Namespace) -> int:
    driver = Driver(args.config)
    driver.load()
    _apply_log_levels(driver)
    await driver.run_forever()
    return 0


@contextlib.asynccontextmanager
async def _storage(config_dir: Path):
    """Database and secret box of a configuration directory, for one-shot commands."""
    driver = Driver(config_dir)
    config = driver.load()
    from .storage.db import Database
    from .storage.secretbox import SecretBox

    db = Database(config.database["url"])
    await db.start()
    try:
        yield driver, db, SecretBox.load_or_create(driver.config_dir)
    finally:
        await db.stop()


async def cmd_device_add(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (driver, db, box):
        device = parse_device(
            {
                "serial": args.serial,
                "hw_type": args.hw_type,
                "sender_id": args.sender_id,
                "master_secret": args.master_secret,
                "master_salt": args.master_salt or "",
                "name": args.name,
            },
            driver.families.keys(),
        )
        await add_device(db, box, device)
    print(f"enrolled {device.serial} (hw_type {device.hw_type})")
    return 0


async def cmd_device_import(args: argparse.Namespace) -> int:
    text = Path(args.file).read_text(encoding="utf-8")
    async with _storage(args.config) as (driver, db, box):
        report = await import_csv(db, box, text, driver.families.keys())
    for serial in report.added:
        print(f"added {serial}")
    for line, message in report.errors:
        print(f"{args.file}:{line}: {message}", file=sys.stderr)
    print(f"{len(report.added)} added, {len(report.errors)} rejected")
    return 0 if not report.errors else 1


async def cmd_device_list(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (driver, db, _box):
        devices = await list_devices(db, offset=args.offset, limit=args.limit)
    print(f"{'serial':<16} {'hw_type':>7} {'family':<18} {'join_date':<25} last_seen")
    for device in devices:
        family = driver.families.get(device.hw_type)
        print(
            f"{device.serial:<16} {device.hw_type:>7} {family.name if family else '?':<18} "
            f"{device.join_date.isoformat() if device.join_date else '-':<25} "
            f"{device.last_seen.isoformat() if device.last_seen else '-'}"
        )
    return 0


def _outcome(done: bool, success: str, missing: str) -> int:
    """Exit status and message of a command that removes something by name."""
    if not done:
        print(missing, file=sys.stderr)
        return 1
    print(success)
    return 0


async def cmd_device_remove(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (_driver, db, _box):
        removed = await delete_device(db, args.serial)
    return _outcome(removed, f"removed {args.serial}", f"no device with serial {args.serial}")


async def cmd_token_create(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (_driver, db, _box):
        token = await create_token(db, args.name)
    print(f"token {args.name!r} created; it is shown only this once:")
    print(token)
    return 0


async def cmd_token_list(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (_driver, db, _box):
        tokens = await list_tokens(db)
    print(f"{'name':<32} {'created':<26} last used")
    for token in tokens:
        used = token.last_used_at.isoformat() if token.last_used_at else "never"
        print(f"{token.name:<32} {token.created_at.isoformat():<26} {used}")
    return 0


async def cmd_token_revoke(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (_driver, db, _box):
        revoked = await revoke_token(db, args.name)
    return _outcome(revoked, f"revoked {args.name}", f"no token named {args.name!r}")


async def cmd_user_add(args: argparse.Namespace) -> int:
    import getpass

    password = args.password if args.password is not None else getpass.getpass("Password: ")
    async with _storage(args.config) as (_driver, db, _box):
        print(await create_user(db, args.username, password))
    return 0


async def cmd_user_list(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (_driver, db, _box):
        for line in await list_users(db):
            print(line)
    return 0


async def cmd_user_remove(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (_driver, db, _box):
        removed = await delete_user(db, args.username)
    return _outcome(removed, f"removed {args.username}", f"no user named {args.username!r}")


async def cmd_firmware_upload(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (driver, db, _box):
        print(
            await firmware_cli.upload_firmware(
                db, driver.config_dir, Path(args.file), hw_type=args.hw_type, version=args.version,
                release_notes=args.notes, hw_types=driver.families.keys(),
            )
        )
    return 0


async def cmd_firmware_list(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (_driver, db, _box):
        for line in await firmware_cli.list_firmware(db, args.hw_type):
            print(line)
    return 0


async def cmd_firmware_target(args: argparse.Namespace) -> int:
    version = None if args.clear else args.version
    if version is None and not args.clear:
        raise FirmwareError(400, "invalid_field", "give a version or --clear", "version")
    if (args.hw_type is None) == (args.serial is None):
        raise FirmwareError(400, "invalid_field", "give exactly one of --hw-type or --serial", "hw_type")
    async with _storage(args.config) as (_driver, db, _box):
        print(await firmware_cli.set_firmware_target(db, version, hw_type=args.hw_type, serial=args.serial))
    return 0


async def cmd_firmware_delete(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (driver, db, _box):
        print(await firmware_cli.delete_firmware(db, driver.config_dir, args.hw_type, args.version))
    return 0


async def cmd_firmware_status(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (_driver, db, _box):
        lines = await firmware_cli.firmware_status(
            db, serial=args.serial, hw_type=args.hw_type, version=args.version
        )
    for line in lines:
        print(line)
    return 0


async def cmd_integration_show(args: argparse.Namespace) -> int:
    async with _storage(args.config) as (driver, db, box):
        from .integrations import IntegrationManager

        driver.db, driver.box = db, box
        assert driver.config is not None
        manager = IntegrationManager(driver, driver._modules, driver.config.integrations)
        effective = await manager._effective()
        hidden = manager.secret_fields(args.domain) if args.domain in manager.modules else frozenset()
    settings = dict(effective.get(args.domain, {}))
    for name in hidden:
        if settings.get(name):
            settings[name] = "********"
    print(json.dumps(settings, indent=2, default=str))
    return 0


async def cmd_integration_set(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    for item in args.values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SettingsError({item: "expected key=value"})
        changes[key] = _parse_value(value)
    async with _storage(args.config) as (driver, db, box):
        from .integrations import IntegrationManager

        driver.db, driver.box = db, box
        assert driver.config is not None
        manager = IntegrationManager(driver, driver._modules, driver.config.integrations)
        await manager.save(args.domain, changes)
    print(f"saved {', '.join(changes)} for {args.domain}; a running driver applies it within seconds")
    return 0


def _parse_value(text: str) -> Any:
    """`qos=1` is a number, `tls_insecure=false` a boolean, anything else a string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, int | float | bool) or value is None else text


async def cmd_simulate(args: argparse.Namespace) -> int:
    families, _ = load_components(Path(args.config).resolve())
    devices = read_devices_csv(Path(args.devices).read_text(encoding="utf-8"), families.keys())
    simulator = Simulator(
        devices, families, args.host, args.port, time_scale=args.time_scale,
        on_event=lambda serial, text: print(f"{serial}: {text}", flush=True),
    )
    await simulator.run(transmissions=args.transmissions)
    return 0


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on `port` (as servers do, despite old connections' TIME_WAIT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def demo_broker_port(host: str, port: int) -> int:
    """The built-in broker's port for the demo: `port` (1883), else DEMO_FALLBACK_PORT, always the
    same, so that the printed `mosquitto_sub` line and the README's stay right."""
    for candidate in dict.fromkeys((port, DEMO_FALLBACK_PORT)):
        if _port_free(host, candidate):
            return candidate
    raise StartupError(
        f"demo: the built-in MQTT broker needs TCP port {port} or {DEMO_FALLBACK_PORT} on {host}, "
        "and both are taken (other MQTT brokers?); stop one, or set mqtt.builtin_port"
    )


def uplink_filter(settings: dict[str, Any]) -> str:
    """The MQTT filter matching every device's uplink topic (each {{placeholder}} a `+`)."""
    return re.sub(r"\{\{\s*\w+\s*\}\}", "+", settings["uplink_topic"])


def demo_instructions(host: str, port: int, settings: dict[str, Any], serials: list[str]) -> list[str]:
    """The exact commands to watch the demo's uplinks and send a command to one of its devices."""
    uplinks = uplink_filter(settings)
    command = re.sub(r"\{\{\s*serial\s*\}\}", serials[0], settings["downlink_command_topic"])
    return [
        f"demo: devices {', '.join(serials)}; built-in MQTT broker on {host}:{port}",
        f"demo: watch the uplinks:  mosquitto_sub -h {host} -p {port} -t '{uplinks}' -v",
        f"demo: send a command:     mosquitto_pub -h {host} -p {port} -t '{command}' "
        """-m '{"command": "reboot", "parameter": 1}'""",
    ]


async def cmd_demo(args: argparse.Namespace) -> int:
    """Driver + built-in broker + three simulated devices, printing what arrives on MQTT."""
    import aiomqtt

    driver = Driver(args.config)
    config = driver.load()
    _apply_log_levels(driver)
    mqtt = config.integrations.setdefault("mqtt", {})
    host, port = mqtt.get("builtin_host", "127.0.0.1"), mqtt.get("builtin_port", 1883)
    if mqtt.get("broker", "builtin") == "builtin":
        chosen = demo_broker_port(host, port)
        if chosen != port:
            print(f"demo: port {port} is taken (another MQTT broker?); the built-in broker uses {chosen}")
        mqtt["builtin_port"] = port = chosen
    csv_path = driver.config_dir / DEMO_CSV

    async def devices_and_subscriber() -> None:
        if not csv_path.exists():
            devices = demo_devices(3, [h for h in DEMO_HW_TYPES if h in driver.families])
            for device in devices:
                await add_device(driver.db, driver.box, device)
            csv_path.write_text(write_devices_csv(devices), encoding="utf-8")
        devices = read_devices_csv(csv_path.read_text(encoding="utf-8"), driver.families.keys())
        assert driver.integrations is not None and driver.config is not None
        settings = driver.integrations.running["mqtt"].settings
        # Saved settings (`coap-driver integration set mqtt ...`) win over the YAML.
        broker_host, broker_port = (
            (settings["builtin_host"], settings["builtin_port"])
            if settings.get("broker", "builtin") == "builtin" else (host, port)
        )
        for line in demo_instructions(broker_host, broker_port, settings, [d.serial for d in devices]):
            print(line)
        http = driver.config.http
        print(
            f"demo: web panel on http://{http['host']}:{driver.api.port}/ "
            "(the first visit creates the admin user); Ctrl-C stops the demo",
            flush=True,
        )
        simulator = Simulator(
            devices, driver.families, "127.0.0.1", driver.coap_port,
            time_scale=args.time_scale, timing=CoapTiming(ack_timeout=1.0),
            on_event=lambda serial, text: None,
        )
        async with aiomqtt.Client(broker_host, broker_port) as client:
            await client.subscribe(uplink_filter(settings), qos=1)
            sim = asyncio.create_task(simulator.run())
            try:
                async for message in client.messages:
                    print(f"{message.topic}  {message.payload.decode()}", flush=True)
            finally:
                await cancel_and_wait(sim)

    await driver.run_forever(alongside=devices_and_subscriber)
    return 0


# --- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coap-driver", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", type=Path, default=Path("config"), help="configuration directory")
    parser.add_argument("--version", action="version", version=f"coap-driver {__version__}")
    commands = parser.add_subparsers(dest="command")

    commands.add_parser("run", help="run the driver (the default)").set_defaults(func=cmd_run)

    demo = commands.add_parser("demo", help="run the driver with three simulated devices")
    demo.add_argument("--time-scale", type=float, default=60.0, help="60: five minutes last five seconds")
    demo.set_defaults(func=cmd_demo)

    device = commands.add_parser("device", help="enroll, list and remove devices")
    device_commands = device.add_subparsers(dest="device_command", required=True)
    add = device_commands.add_parser("add", help="enroll one device")
    add.add_argument("--serial", required=True)
    add.add_argument("--hw-type", required=True)
    add.add_argument("--sender-id", required=True, help="hex, 1-7 bytes (the kid)")
    add.add_argument("--master-secret", required=True, help="hex, 16 bytes")
    add.add_argument("--master-salt", default="", help="hex, 0 or 8 bytes")
    add.add_argument("--name")
    add.set_defaults(func=cmd_device_add)
    imp = device_commands.add_parser("import", help="enroll devices from a CSV file")
    imp.add_argument("file")
    imp.set_defaults(func=cmd_device_import)
    lst = device_commands.add_parser("list", help="list enrolled devices")
    lst.add_argument("--offset", type=int, default=0)
    lst.add_argument("--limit", type=int, default=100)
    lst.set_defaults(func=cmd_device_list)
    rem = device_commands.add_parser("remove", help="delete a device")
    rem.add_argument("serial")
    rem.set_defaults(func=cmd_device_remove)

    token = commands.add_parser("token", help="REST API bearer tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="create a token (printed once)")
    create.add_argument("name")
    create.set_defaults(func=cmd_token_create)
    token_commands.add_parser("list", help="list tokens").set_defaults(func=cmd_token_list)
    revoke = token_commands.add_parser("revoke", help="revoke a token")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_token_revoke)

    user = commands.add_parser("user", help="web panel users")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    uadd = user_commands.add_parser("add", help="create a user (asks for the password)")
    uadd.add_argument("username")
    uadd.add_argument("--password", help="for scripts; prefer the prompt")
    uadd.set_defaults(func=cmd_user_add)
    user_commands.add_parser("list", help="list users").set_defaults(func=cmd_user_list)
    urem = user_commands.add_parser("remove", help="delete a user")
    urem.add_argument("username")
    urem.set_defaults(func=cmd_user_remove)

    firmware = commands.add_parser("firmware", help="firmware library and over-the-air updates")
    fw = firmware.add_subparsers(dest="firmware_command", required=True)
    up = fw.add_parser("upload", help="add an image to the library")
    up.add_argument("file")
    up.add_argument("--hw-type", type=int, required=True)
    up.add_argument("--version", required=True)
    up.add_argument("--notes", help="release notes")
    up.set_defaults(func=cmd_firmware_upload)
    ls = fw.add_parser("list", help="list images")
    ls.add_argument("--hw-type", type=int)
    ls.set_defaults(func=cmd_firmware_list)
    tg = fw.add_parser("target", help="make a version the target of a hw_type or a device")
    tg.add_argument("version", nargs="?")
    tg.add_argument("--hw-type", type=int)
    tg.add_argument("--serial")
    tg.add_argument("--clear", action="store_true", help="remove the target")
    tg.set_defaults(func=cmd_firmware_target)
    rm = fw.add_parser("delete", help="delete an image (refused while devices download it)")
    rm.add_argument("--hw-type", type=int, required=True)
    rm.add_argument("--version", required=True)
    rm.set_defaults(func=cmd_firmware_delete)
    st = fw.add_parser("status", help="a device's update, or an image's campaign")
    st.add_argument("--serial")
    st.add_argument("--hw-type", type=int)
    st.add_argument("--version")
    st.set_defaults(func=cmd_firmware_status)

    integ = commands.add_parser("integration", help="show or change an integration's settings")
    integ_commands = integ.add_subparsers(dest="integration_command", required=True)
    show = integ_commands.add_parser("show")
    show.add_argument("domain")
    show.set_defaults(func=cmd_integration_show)
    setp = integ_commands.add_parser("set", help="e.g. set mqtt uplink_topic=devices/{{serial}}")
    setp.add_argument("domain")
    setp.add_argument("values", nargs="+", metavar="key=value")
    setp.set_defaults(func=cmd_integration_set)

    sim = commands.add_parser("simulate", help="run simulated devices from a device CSV")
    sim.add_argument("--devices", required=True, help="CSV with serial,hw_type,sender_id,master_secret,master_salt")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=5683)
    sim.add_argument("--time-scale", type=float, default=1.0)
    sim.add_argument("--transmissions", type=int, default=None, help="stop after N rx per device")
    sim.set_defaults(func=cmd_simulate)

    ops_cli.register(commands)  # backup, restore, db, broker, logging
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", cmd_run)
    # One-shot commands print their own results; only the long-running ones narrate.
    _setup_logging("INFO" if func in (cmd_run, cmd_demo, cmd_simulate) else "WARNING")
    expected = EXPECTED_ERRORS + _broker_error_types()
    serving = func in (cmd_run, cmd_demo)
    if serving:
        runtime.tune_garbage_collector()
    try:
        return runtime.run(func(args)) if serving else asyncio.run(func(args))
    except expected as exc:
        print(f"coap-driver: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"coap-driver: {exc.filename}: file not found", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
