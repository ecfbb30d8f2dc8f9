"""The command line: one clear line and exit status 2 for every expected failure, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from driver_core import __version__

CSV_HEADER = "serial,hw_type,sender_id,master_secret,master_salt\n"
GOOD_ROW = "A0000001,17,a001,000102030405060708090a0b0c0d0e0f,0001020304050607\n"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "driver_core", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )


def test_version(tmp_path: Path):
    result = run_cli("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"coap-driver {__version__}\n")


def test_bad_configuration_is_one_line_without_traceback(tmp_path: Path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "configuration.yaml").write_text("coap:\n  port: 70000\n", encoding="utf-8")
    result = run_cli("--config", str(config), "device", "list", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("coap-driver: ")
    assert "coap.port" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("coap-driver:")]) == 1


def test_first_run_creates_configuration_and_enrolls_from_csv(tmp_path: Path):
    config = tmp_path / "config"
    devices = tmp_path / "devices.csv"
    devices.write_text(
        CSV_HEADER + GOOD_ROW + "a0000002,17,a002,000102030405060708090a0b0c0d0e0f,\n"
        "A0000003,99,a003,000102030405060708090a0b0c0d0e0f,\n",
        encoding="utf-8",
    )
    result = run_cli("--config", str(config), "device", "import", str(devices), cwd=tmp_path)
    assert result.returncode == 1
    assert (config / "configuration.yaml").is_file()
    assert result.stdout.splitlines() == ["added A0000001", "1 added, 2 rejected"]
    errors = result.stderr.splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"{devices}:3: serial")
    assert errors[1].startswith(f"{devices}:4: hw_type")
    assert "Traceback" not in result.stderr

    listed = run_cli("--config", str(config), "device", "list", cwd=tmp_path)
    assert listed.returncode == 0
    rows = listed.stdout.splitlines()
    assert len(rows) == 2 and rows[1].split()[:3] == ["A0000001", "17", "VIDI"]


def test_device_add_refuses_bad_secret_with_the_field_name(tmp_path: Path):
    result = run_cli(
        "--config", str(tmp_path / "config"), "device", "add", "--serial", "A0000009",
        "--hw-type", "17", "--sender-id", "a009", "--master-secret", "0011", cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("coap-driver: master_secret: ")
    assert "Traceback" not in result.stderr


def test_integration_set_validates_and_saves(tmp_path: Path):
    config = tmp_path / "config"
    bad = run_cli("--config", str(config), "integration", "set", "mqtt", "qos=3", cwd=tmp_path)
    assert bad.returncode == 2
    assert "qos" in bad.stderr and "Traceback" not in bad.stderr
    good = run_cli(
        "--config", str(config), "integration", "set", "mqtt", "uplink_topic=sites/{{serial}}/up",
        cwd=tmp_path,
    )
    assert good.returncode == 0, good.stderr
    shown = run_cli("--config", str(config), "integration", "show", "mqtt", cwd=tmp_path)
    assert '"uplink_topic": "sites/{{serial}}/up"' in shown.stdout


def test_token_create_list_revoke(tmp_path: Path):
    config = tmp_path / "config"
    created = run_cli("--config", str(config), "token", "create", "erp", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    assert lines[0] == "token 'erp' created; it is shown only this once:"
    assert lines[1].startswith("cdt_") and len(lines[1]) > 40
    duplicate = run_cli("--config", str(config), "token", "create", "erp", cwd=tmp_path)
    assert duplicate.returncode == 2 and "Traceback" not in duplicate.stderr
    listed = run_cli("--config", str(config), "token", "list", cwd=tmp_path)
    assert [row.split()[0] for row in listed.stdout.splitlines()] == ["name", "erp"]
    assert lines[1] not in listed.stdout  # only the hash is stored
    assert run_cli("--config", str(config), "token", "revoke", "erp", cwd=tmp_path).returncode == 0
    missing = run_cli("--config", str(config), "token", "revoke", "erp", cwd=tmp_path)
    assert (missing.returncode, missing.stderr) == (1, "no token named 'erp'\n")


def test_user_add_list_remove(tmp_path: Path):
    config = tmp_path / "config"
    added = run_cli("--config", str(config), "user", "add", "ops", "--password", "correct horse 42", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    listed = run_cli("--config", str(config), "user", "list", cwd=tmp_path)
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["ops"]
    assert run_cli("--config", str(config), "user", "remove", "ops", cwd=tmp_path).returncode == 0
    missing = run_cli("--config", str(config), "user", "remove", "ops", cwd=tmp_path)
    assert (missing.returncode, missing.stderr) == (1, "no user named 'ops'\n")


def test_firmware_upload_target_list_and_refusals(tmp_path: Path):
    config = tmp_path / "config"
    image = tmp_path / "fw.bin"
    image.write_bytes(bytes(range(256)) * 8)
    uploaded = run_cli(
        "--config", str(config), "firmware", "upload", str(image), "--hw-type", "17", "--version", "2.0.0",
        cwd=tmp_path,
    )
    assert uploaded.returncode == 0, uploaded.stderr
    assert uploaded.stdout.startswith("uploaded 2.0.0 for hw_type 17: 2048 bytes, sha256 ")
    bad = run_cli(
        "--config", str(config), "firmware", "upload", str(image), "--hw-type", "99", "--version", "2.0.1",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("coap-driver: hw_type must be one of: ")
    targeted = run_cli("--config", str(config), "firmware", "target", "2.0.0", "--hw-type", "17", cwd=tmp_path)
    assert targeted.stdout == "hw_type 17: firmware target is now 2.0.0\n"
    listed = run_cli("--config", str(config), "firmware", "list", cwd=tmp_path)
    assert listed.stdout.splitlines()[1].split()[:3] == ["17", "2.0.0", "2048"]
    assert listed.stdout.splitlines()[1].endswith("hw_type")
