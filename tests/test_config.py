"""configuration.yaml: first run, defaults, !secret, !include and every bad-input message."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import voluptuous as vol

from driver_core.config import (
    ConfigError,
    CoreConfig,
    default_configuration,
    ensure_config_dir,
    load_configuration,
)

REPO = Path(__file__).resolve().parent.parent

# Stand-in for an integration's config_flow.SETTINGS_SCHEMA (with defaults, like the real ones).
MQTT_SCHEMA = vol.Schema(
    {
        vol.Optional("external", default=False): bool,
        vol.Optional("broker_url"): str,
        vol.Optional("password"): str,
        vol.Optional("qos", default=0): vol.In([0, 1, 2]),
        vol.Optional("uplink_topic", default="application/COAP/device/{{serial}}/uplink"): str,
    }
)
CALLBACKS_SCHEMA = vol.Schema(vol.All(lambda v: v or {}, {vol.Optional("timeout", default=5): int}))
SCHEMAS = {"mqtt": MQTT_SCHEMA, "callbacks": CALLBACKS_SCHEMA}


def write(directory: Path, text: str, name: str = "configuration.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def error_of(config_dir: Path, schemas: dict[str, vol.Schema] = SCHEMAS) -> str:
    with pytest.raises(ConfigError) as info:
        load_configuration(config_dir, schemas)
    return str(info.value)


def expected_defaults(config_dir: Path, integrations: dict) -> CoreConfig:
    return CoreConfig(
        config_dir=config_dir,
        coap={
            "host": "::", "port": 5683, "max_payload": 1024, "context_cache_size": 100000,
            "refusals_per_second": 20, "refusal_burst": 100,
        },
        database={"url": f"sqlite+aiosqlite:///{config_dir}/coap-driver.db"},
        logger={"default": "INFO", "format": "text", "logs": {}},
        http={
            "host": "127.0.0.1", "port": 8080, "auth_failures_per_minute": 10, "auth_failure_burst": 20,
        },
        retention={"uplinks_days": 30, "downlinks_days": 30},
        devices={"tx_interval": 60, "grace_minutes": 15},
        downlinks={"ack_timeout": 300, "max_pending": 100},
        fota={"stall_minutes": 30},
        cluster={"enabled": False, "name": None, "heartbeat_seconds": 5, "dead_after_seconds": 30},
        integrations=integrations,
    )


MQTT_DEFAULTS = {
    "external": False,
    "qos": 0,
    "uplink_topic": "application/COAP/device/{{serial}}/uplink",
}


# --- first run and defaults ---


def test_first_run_creates_default_and_it_loads(tmp_path: Path) -> None:
    config_dir = tmp_path / "new" / "config"
    assert ensure_config_dir(config_dir) is True
    config_file = config_dir / "configuration.yaml"
    assert config_file.read_text(encoding="utf-8") == default_configuration()
    assert ensure_config_dir(config_dir) is False  # never overwritten

    config = load_configuration(config_dir, SCHEMAS)
    assert config == expected_defaults(config_dir, {"mqtt": MQTT_DEFAULTS, "callbacks": {"timeout": 5}})
    assert config.config_file == config_file


def test_existing_configuration_is_kept(tmp_path: Path) -> None:
    write(tmp_path, "coap:\n  port: 5700\n")
    assert ensure_config_dir(tmp_path) is False
    assert load_configuration(tmp_path, SCHEMAS).coap["port"] == 5700


def test_shipped_example_matches_the_default(tmp_path: Path) -> None:
    shutil.copy(REPO / "config" / "configuration.yaml", tmp_path / "configuration.yaml")
    assert load_configuration(tmp_path, SCHEMAS) == expected_defaults(
        tmp_path, {"mqtt": MQTT_DEFAULTS, "callbacks": {"timeout": 5}}
    )


def test_empty_file_means_all_defaults_and_no_integrations(tmp_path: Path) -> None:
    write(tmp_path, "# nothing yet\n")
    assert load_configuration(tmp_path, SCHEMAS) == expected_defaults(tmp_path, {})


def test_relative_config_dir_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path / "cfg", "")
    monkeypatch.chdir(tmp_path)
    config = load_configuration(Path("cfg"), SCHEMAS)
    assert config.config_dir == tmp_path / "cfg"
    assert config.database["url"] == f"sqlite+aiosqlite:///{tmp_path}/cfg/coap-driver.db"


def test_all_keys_set(tmp_path: Path) -> None:
    write(
        tmp_path,
        """
        coap:
          host: 0.0.0.0
          port: 0
          max_payload: 512
          context_cache_size: 0
        http:
          host: "::1"
          port: 9000
        logger:
          default: WARN
          logs:
            driver_core.coap_server: debug
            aiocoap: Fatal
        retention:
          uplinks_days: 7
          downlinks_days: 90
        devices:
          tx_interval: 15
          grace_minutes: 0
        mqtt:
          external: true
          broker_url: mqtts://broker.example.com:8883
          qos: 1
        """,
    )
    config = load_configuration(tmp_path, SCHEMAS)
    assert config.coap == {
        "host": "0.0.0.0",
        "port": 0,
        "max_payload": 512,
        "context_cache_size": 0,
        "refusals_per_second": 20,
        "refusal_burst": 100,
    }
    assert config.http == {
        "host": "::1", "port": 9000, "auth_failures_per_minute": 10, "auth_failure_burst": 20,
    }
    assert config.logger == {
        "default": "WARNING",
        "format": "text",
        "logs": {"driver_core.coap_server": "DEBUG", "aiocoap": "CRITICAL"},
    }
    assert config.retention == {"uplinks_days": 7, "downlinks_days": 90}
    assert config.devices == {"tx_interval": 15, "grace_minutes": 0}
    assert config.integrations == {
        "mqtt": {
            "external": True,
            "broker_url": "mqtts://broker.example.com:8883",
            "qos": 1,
            "uplink_topic": "application/COAP/device/{{serial}}/uplink",
        }
    }
    assert type(config.integrations["mqtt"]) is dict  # no loader bookkeeping leaks out


# --- database URL ---


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("sqlite+aiosqlite:///data/driver.db", "sqlite+aiosqlite:///{dir}/data/driver.db"),
        ("sqlite+aiosqlite:////var/lib/driver.db", "sqlite+aiosqlite:////var/lib/driver.db"),
        ("sqlite+aiosqlite:///{config_dir}/x.db", "sqlite+aiosqlite:///{dir}/x.db"),
        ("sqlite:///driver.db", "sqlite+aiosqlite:///{dir}/driver.db"),
        (
            "postgresql+asyncpg://user:p%40ss@db.example.com:5433/coap",
            "postgresql+asyncpg://user:p%40ss@db.example.com:5433/coap",
        ),
        ("postgresql://user@localhost/coap", "postgresql+asyncpg://user@localhost/coap"),
        ("postgres://localhost/coap", "postgresql+asyncpg://localhost/coap"),
    ],
)
def test_database_urls(tmp_path: Path, written: str, expected: str) -> None:
    write(tmp_path, f"database:\n  url: {written}\n")
    config = load_configuration(tmp_path, SCHEMAS)
    assert config.database == {"url": expected.replace("{dir}", str(tmp_path))}


# --- !secret and !include ---


def test_secret_values(tmp_path: Path) -> None:
    write(
        tmp_path,
        """
        database:
          url: !secret database_url
        mqtt:
          password: !secret mqtt_password
        """,
    )
    write(
        tmp_path,
        "database_url: postgresql+asyncpg://driver:pw@127.0.0.1/coap\nmqtt_password: s3cret\n",
        "secrets.yaml",
    )
    config = load_configuration(tmp_path, SCHEMAS)
    assert config.database["url"] == "postgresql+asyncpg://driver:pw@127.0.0.1/coap"
    assert config.integrations["mqtt"]["password"] == "s3cret"


def test_missing_secret_names_key_and_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "mqtt:\n  qos: 1\n  password: !secret mqtt_pasword\n")
    write(tmp_path, "mqtt_password: s3cret\n", "secrets.yaml")
    assert error_of(tmp_path) == (
        f"{cfg}:3: secret 'mqtt_pasword' is not defined in {tmp_path}/secrets.yaml"
    )


def test_missing_secrets_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "mqtt:\n  password: !secret mqtt_password\n")
    assert error_of(tmp_path) == (
        f"{cfg}:2: !secret mqtt_password: {tmp_path}/secrets.yaml does not exist"
    )


def test_secrets_file_must_be_a_mapping(tmp_path: Path) -> None:
    write(tmp_path, "mqtt:\n  password: !secret mqtt_password\n")
    secrets = write(tmp_path, "- just\n- a list\n", "secrets.yaml")
    assert error_of(tmp_path) == f"{secrets}:1: must be a mapping of secret names to values"


def test_secret_without_name(tmp_path: Path) -> None:
    cfg = write(tmp_path, "mqtt:\n  password: !secret\n")
    assert error_of(tmp_path) == (
        f"{cfg}:2: !secret needs a secret name, e.g. !secret mqtt_password"
    )


def test_include_relative_to_the_including_file(tmp_path: Path) -> None:
    write(tmp_path, "mqtt: !include integrations/mqtt.yaml\nlogger: !include logger.yaml\n")
    write(tmp_path, "qos: 2\nexternal: !include ../flag.yaml\n", "integrations/mqtt.yaml")
    write(tmp_path, "true\n", "flag.yaml")
    write(tmp_path, "default: debug\n", "logger.yaml")
    config = load_configuration(tmp_path, SCHEMAS)
    assert config.integrations["mqtt"]["qos"] == 2
    assert config.integrations["mqtt"]["external"] is True
    assert config.logger == {"default": "DEBUG", "format": "text", "logs": {}}


def test_error_inside_included_file_points_there(tmp_path: Path) -> None:
    write(tmp_path, "coap:\n  port: 5683\nmqtt: !include mqtt.yaml\n")
    included = write(tmp_path, "# MQTT settings\nexternal: false\nqos: 5\n", "mqtt.yaml")
    assert error_of(tmp_path) == f"{included}:3: mqtt.qos: value must be one of [0, 1, 2]"


def test_syntax_error_inside_included_file(tmp_path: Path) -> None:
    write(tmp_path, "mqtt: !include mqtt.yaml\n")
    included = write(tmp_path, "qos: 1\nexternal: [true\n", "mqtt.yaml")
    assert error_of(tmp_path) == (
        f"{included}:3: invalid YAML: expected ',' or ']', but got '<stream end>'"
    )


def test_secret_inside_included_file_uses_the_config_dir(tmp_path: Path) -> None:
    write(tmp_path, "mqtt: !include sub/mqtt.yaml\n")
    write(tmp_path, "password: !secret pw\n", "sub/mqtt.yaml")
    write(tmp_path, "pw: from-root\n", "secrets.yaml")
    assert load_configuration(tmp_path, SCHEMAS).integrations["mqtt"]["password"] == "from-root"


def test_empty_included_file_means_defaults(tmp_path: Path) -> None:
    write(tmp_path, "mqtt: !include mqtt.yaml\n")
    write(tmp_path, "# nothing set yet\n", "mqtt.yaml")
    assert load_configuration(tmp_path, SCHEMAS).integrations == {"mqtt": MQTT_DEFAULTS}


def test_merge_keys_own_keys_win(tmp_path: Path) -> None:
    write(
        tmp_path,
        """
        http: &listen
          host: 0.0.0.0
          port: 8081
        coap:
          <<: *listen
          port: 5684
        """,
    )
    config = load_configuration(tmp_path, SCHEMAS)
    assert config.coap["host"] == "0.0.0.0"
    assert config.coap["port"] == 5684
    assert (config.http["host"], config.http["port"]) == ("0.0.0.0", 8081)


def test_missing_include(tmp_path: Path) -> None:
    cfg = write(tmp_path, "coap:\n  port: 5683\nmqtt: !include nope.yaml\n")
    assert error_of(tmp_path) == f"{cfg}:3: !include: {tmp_path}/nope.yaml does not exist"


def test_include_cycle(tmp_path: Path) -> None:
    write(tmp_path, "mqtt: !include a.yaml\n")
    a = write(tmp_path, "qos: !include configuration.yaml\n", "a.yaml")
    assert error_of(tmp_path) == (
        f"{a}:1: !include {tmp_path}/configuration.yaml includes itself (directly or indirectly)"
    )


# --- bad input: one exact line each ---

BAD_INPUT = [
    pytest.param(
        "coap:\n  port: 5683\n    host: '::'\n",
        "3: invalid YAML: mapping values are not allowed here",
        id="yaml-syntax",
    ),
    pytest.param(
        "coap:\n\tport: 5683\n",
        "2: invalid YAML: found character '\\t' that cannot start any token",
        id="yaml-tab",
    ),
    pytest.param(
        "coap:\n  port: 5683\n  port: 5684\n",
        "3: duplicate key 'port' (first defined on line 2)",
        id="duplicate-key",
    ),
    pytest.param(
        "coap:\n  host: '::'\n  port: abc\n",
        "3: coap.port: expected an integer",
        id="wrong-type",
    ),
    pytest.param("coap:\n  port: true\n", "2: coap.port: expected an integer", id="bool-not-int"),
    pytest.param(
        "http:\n  port: 70000\n", "2: http.port: value must be at most 65535", id="port-range"
    ),
    pytest.param(
        "coap:\n  port: -1\n", "2: coap.port: value must be at least 0", id="port-negative"
    ),
    pytest.param(
        "coap:\n  max_payload: 2048\n",
        "2: coap.max_payload: value must be at most 1024",
        id="payload-range",
    ),
    pytest.param(
        "coap:\n  host: localhost\n",
        "2: coap.host: 'localhost' is not an IP address (use e.g. '::', '0.0.0.0' or '127.0.0.1')",
        id="host-not-ip",
    ),
    pytest.param(
        "coap:\n  port: 5683\n  prot: 5684\n",
        "3: coap.prot: unknown key (valid keys: context_cache_size, host, max_payload, port, "
        "refusal_burst, refusals_per_second)",
        id="unknown-key",
    ),
    pytest.param(
        "coap:\n  port: 5683\nmqqt:\n  qos: 1\n",
        "3: mqqt: unknown section (valid sections: callbacks, cluster, coap, database, devices, downlinks, "
        "fota, http, logger, mqtt, retention, shutdown)",
        id="unknown-section",
    ),
    pytest.param("coap: 5683\n", "1: coap: expected a mapping (key: value lines)", id="not-map"),
    pytest.param(
        "- coap\n",
        "1: the top level must be a mapping of sections (coap:, database: ...)",
        id="top-level-list",
    ),
    pytest.param(
        "database:\n  url: mysql+aiomysql://user@host/db\n",
        "2: database.url: unsupported database scheme 'mysql+aiomysql' "
        "(use one of: sqlite+aiosqlite, postgresql+asyncpg)",
        id="db-scheme",
    ),
    pytest.param(
        "database:\n  url: just some words\n",
        "2: database.url: not a database URL (use e.g. sqlite+aiosqlite:///coap-driver.db or "
        "postgresql+asyncpg://user:password@host/dbname)",
        id="db-garbage",
    ),
    pytest.param(
        "database:\n  url: 'sqlite+aiosqlite:///:memory:'\n",
        "2: database.url: an SQLite database needs a file path, "
        "e.g. sqlite+aiosqlite:///coap-driver.db",
        id="db-memory",
    ),
    pytest.param(
        "database:\n  url: sqlite+aiosqlite://\n",
        "2: database.url: an SQLite database needs a file path, "
        "e.g. sqlite+aiosqlite:///coap-driver.db",
        id="db-sqlite-no-path",
    ),
    pytest.param(
        "logger:\n  default: info\n  logs:\n    aiocoap: verbose\n",
        "4: logger.logs.aiocoap: invalid log level 'verbose' "
        "(use one of: critical, error, warning, info, debug, notset)",
        id="log-level",
    ),
    pytest.param(
        "retention:\n  uplinks_days: 0\n",
        "2: retention.uplinks_days: value must be at least 1",
        id="retention-range",
    ),
    pytest.param(
        "devices:\n  tx_interval: 1.5\n",
        "2: devices.tx_interval: expected an integer",
        id="tx-interval-float",
    ),
    pytest.param(
        "mqtt:\n  external: true\n  qos: 3\n",
        "3: mqtt.qos: value must be one of [0, 1, 2]",
        id="integration-value",
    ),
    pytest.param(
        "mqtt:\n  external: 'yes'\n",
        "2: mqtt.external: expected true or false",
        id="integration-type",
    ),
    pytest.param(
        "mqtt:\n  qos: 1\n  topic: x\n",
        "3: mqtt.topic: unknown key (valid keys: broker_url, external, password, qos, "
        "uplink_topic)",
        id="integration-unknown-key",
    ),
    pytest.param(
        "coap:\n  port: 1\nhttp:\n  port: 99999\ncoap2: 1\n",
        "5: coap2: unknown section (valid sections: callbacks, cluster, coap, database, devices, downlinks, "
        "fota, http, logger, mqtt, retention, shutdown)",
        id="unknown-section-reported-first",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_INPUT)
def test_bad_input_gives_one_exact_line(tmp_path: Path, text: str, expected: str) -> None:
    cfg = write(tmp_path, text)
    message = error_of(tmp_path)
    assert message == f"{cfg}:{expected}"
    assert "\n" not in message


def test_first_problem_by_line_is_reported(tmp_path: Path) -> None:
    cfg = write(tmp_path, "http:\n  port: x\n  host: nowhere\n")
    assert error_of(tmp_path) == f"{cfg}:2: http.port: expected an integer"


def test_required_integration_key_missing_points_at_section(tmp_path: Path) -> None:
    schemas = {"mqtt": vol.Schema({vol.Required("broker_url"): str})}
    cfg = write(tmp_path, "coap:\n  port: 1\nmqtt:\n")
    assert error_of(tmp_path, schemas) == f"{cfg}:3: mqtt.broker_url: required key is missing"
    cfg = write(tmp_path, "mqtt:\n  # later\n\n  other: 1\n")
    assert error_of(tmp_path, schemas) == (
        f"{cfg}:4: mqtt.other: unknown key (valid keys: broker_url)"
    )


def test_section_of_unknown_integration_lists_installed_ones(tmp_path: Path) -> None:
    cfg = write(tmp_path, "mqtt:\n")
    assert error_of(tmp_path, {}) == (
        f"{cfg}:1: mqtt: unknown section (valid sections: cluster, coap, database, devices, downlinks, "
        "fota, http, logger, retention, shutdown)"
    )


def test_error_fields(tmp_path: Path) -> None:
    cfg = write(tmp_path, "coap:\n  port: abc\n")
    with pytest.raises(ConfigError) as info:
        load_configuration(tmp_path, SCHEMAS)
    err = info.value
    assert (err.file, err.line, err.key_path, err.problem) == (
        str(cfg),
        2,
        "coap.port",
        "expected an integer",
    )


def test_missing_configuration_file(tmp_path: Path) -> None:
    assert error_of(tmp_path) == (
        f"{tmp_path}/configuration.yaml: file not found (run once to create the default)"
    )


def test_not_utf8(tmp_path: Path) -> None:
    cfg = tmp_path / "configuration.yaml"
    cfg.write_bytes(b"coap:\n  host: \xff\n")
    assert error_of(tmp_path) == f"{cfg}: not valid UTF-8 text (invalid start byte)"


def test_config_dir_that_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError) as info:
        ensure_config_dir(not_a_dir)
    assert str(info.value) == f"{not_a_dir}: exists but is not a directory"


def test_integration_domain_may_not_shadow_core_section(tmp_path: Path) -> None:
    write(tmp_path, "")
    assert error_of(tmp_path, {"http": vol.Schema({})}) == (
        "integration domain 'http' clashes with a core section"
    )
