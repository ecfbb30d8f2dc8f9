"""What `coap-driver firmware upload/list/target/delete/status` call (wired in driver_core/cli.py).

Each opens nothing itself: the CLI gives the database (and the configuration
directory for the image files), calls one function and prints the returned
lines. A FirmwareError is one line for the user (its `detail`). A running
driver notices the changes within its poll interval (5 s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from pathlib import Path

from driver_core.storage.db import Database

from . import library
from .library import FirmwareError

__all__ = [
    "FirmwareError", "delete_firmware", "firmware_status", "list_firmware", "set_firmware_target",
    "upload_firmware",
]


async def upload_firmware(
    db: Database,
    config_dir: Path,
    file: Path,
    *,
    hw_type: int,
    version: str,
    release_notes: str | None = None,
    hw_types: Collection[int] | None = None,
) -> str:
    """Add `file` to the library; `hw_types`: the supported ones (refuse others)."""
    if hw_types is not None and hw_type not in hw_types:
        listed = ", ".join(str(code) for code in sorted(hw_types))
        raise FirmwareError(400, "invalid_field", f"hw_type must be one of: {listed}", "hw_type")
    path = Path(file)
    if not await asyncio.to_thread(path.is_file):
        raise FirmwareError(400, "invalid_field", f"{path}: no such file", "file")
    image = await library.save_image_file(
        db, config_dir, path, hw_type=hw_type, version=version, release_notes=release_notes
    )
    return f"uploaded {image.version} for hw_type {image.hw_type}: {image.size} bytes, sha256 {image.sha256}"


async def list_firmware(db: Database, hw_type: int | None = None) -> list[str]:
    """One line per image, with its target marks."""
    targets = await library.list_targets(db)
    family_targets = {(t.image.hw_type, t.image.version) for t in targets if t.serial is None}
    device_targets: dict[tuple[int, str], int] = {}
    for target in targets:
        if target.serial is not None:
            key = (target.image.hw_type, target.image.version)
            device_targets[key] = device_targets.get(key, 0) + 1
    lines = [f"{'hw_type':>7} {'version':<20} {'size':>9} {'sha256':<16} {'uploaded':<25} target"]
    for image in await library.list_images(db, hw_type):
        key = (image.hw_type, image.version)
        marks = []
        if key in family_targets:
            marks.append("hw_type")
        if key in device_targets:
            marks.append(f"{device_targets[key]} device(s)")
        lines.append(
            f"{image.hw_type:>7} {image.version:<20} {image.size:>9} {image.sha256[:16]:<16} "
            f"{image.uploaded_at.isoformat():<25} {', '.join(marks) or '-'}"
        )
    return lines


async def set_firmware_target(
    db: Database,
    version: str | None,
    *,
    hw_type: int | None = None,
    serial: str | None = None,
) -> str:
    """Target `version` for a hw_type or one device; `version=None` removes the target."""
    who = f"hw_type {hw_type}" if serial is None else f"device {serial}"
    if version is None:
        if not await library.clear_target(db, hw_type=hw_type, serial=serial):
            raise FirmwareError(404, "not_found", f"{who} has no firmware target")
        return f"{who}: no firmware target any more"
    await library.set_target(db, version, hw_type=hw_type, serial=serial)
    return f"{who}: firmware target is now {version}"


async def delete_firmware(db: Database, config_dir: Path, hw_type: int, version: str) -> str:
    image = await library.delete_image(db, config_dir, hw_type, version)
    return f"deleted {image.version} for hw_type {image.hw_type}"


async def firmware_status(db: Database, serial: str | None = None, hw_type: int | None = None,
                          version: str | None = None) -> list[str]:
    """A device's firmware and update (serial), or an image's campaign counts (hw_type+version)."""
    if serial is not None:
        status = await library.device_status(db, serial)
        update = status["update"]
        lines = [
            f"{status['serial']}: firmware {status['firmware'] or '?'}, target "
            f"{status['target'] or '-'}" + (f" ({status['target_scope']})" if status["target"] else "")
        ]
        if update is not None:
            lines.append(
                f"update {update['version']}: {update['state']}, {update['percent']} % "
                f"({update['received_bytes']}/{update['size']} bytes, {update['blocks']} blocks), "
                f"last block {update['last_block_at'] or '-'}"
                + (f", error: {update['error']}" if update["error"] else "")
            )
        return lines
    if hw_type is None or version is None:
        raise ValueError("give a serial, or a hw_type and a version")
    image = await library.require_image(db, hw_type, version)
    counts = await library.campaign_counts(db, image)
    return [f"{name:<12} {count}" for name, count in counts.items()]
