"""Firmware: the image library (upload, delete), targets per hw_type, campaign counts per state.

The same library functions as the REST API and the CLI; a change is passed to
the running FOTA service at once so devices see it on their next check.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from aiohttp import web

from driver_core.fota import library
from driver_core.fota.library import RELEASE_NOTES_MAX, STATES, FirmwareError

from .context import FILES, driver, form, page, redirect

routes = web.RouteTableDef()
UPLOAD_FIELDS = ("hw_type", "version", "release_notes")


def _service(request: web.Request) -> Any:
    return getattr(driver(request), "fota", None)


async def device_firmware(the_driver: Any, serial: str) -> dict[str, Any]:
    """A device's firmware status for the Overview (times as datetimes for the templates)."""
    service = getattr(the_driver, "fota", None)
    if service is not None:
        status = await service.device_status(serial)
    else:
        status = await library.device_status(the_driver.db, serial)
    update = status.get("update")
    if update is not None:
        update = dict(update)
        for key in ("offered_at", "started_at", "last_block_at", "finished_at"):
            if update.get(key):
                update[key] = datetime.fromisoformat(update[key].replace("Z", "+00:00"))
        status["update"] = update
    return status


def _hw_types(request: web.Request) -> list[tuple[int, str]]:
    return [
        (hw_type, f"{hw_type} — {family.hw_types[hw_type]} ({family.name})")
        for hw_type, family in sorted(driver(request).families.items())
    ]


async def _campaigns(request: web.Request, images: list[library.ImageView]) -> dict[int, dict]:
    service = _service(request)
    if service is not None:
        await service.flush()  # counts include what is only in memory yet
    db = driver(request).db
    return {image.id: await library.campaign_counts(db, image) for image in images}


async def _page(request: web.Request, status: int = 200, **values: Any) -> web.Response:
    values.setdefault("values", {})
    values.setdefault("errors", {})
    values.setdefault("target_errors", {})
    the_driver = driver(request)
    images = await library.list_images(the_driver.db)
    targets = await library.list_targets(the_driver.db)
    return page(
        request,
        "firmware.html",
        status=status,
        title="Firmware",
        images=images,
        campaigns=await _campaigns(request, images),
        hw_targets={t.hw_type: t.image.version for t in targets if t.serial is None},
        device_targets=[t for t in targets if t.serial is not None],
        hw_types=_hw_types(request),
        states=STATES,
        notes_max=RELEASE_NOTES_MAX,
        **values,
    )


async def _changed(request: web.Request) -> None:
    service = _service(request)
    if service is not None:
        await service.reload()


@routes.get("/firmware")
async def firmware(request: web.Request) -> web.Response:
    return await _page(request)


def _hw_type(request: web.Request, raw: str) -> int:
    """A supported hw_type from a form field (FirmwareError on the field otherwise)."""
    try:
        hw_type = int(raw)
    except ValueError:
        hw_type = -1
    if hw_type not in driver(request).families:
        raise FirmwareError(400, "invalid_field", "choose a supported device type", "hw_type")
    return hw_type


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


@routes.post("/firmware/upload")
async def upload(request: web.Request) -> web.Response:
    data = form(request)
    values = {key: data.get(key, "") for key in UPLOAD_FIELDS}
    content = request.get(FILES, {}).get("file")
    errors: dict[str, str] = {}
    if content is None and data.get("file__error"):  # too large (binary is fine here)
        errors["file"] = data["file__error"]
    elif not content:
        errors["file"] = "choose the image file (it must not be empty)"
    try:
        hw_type = _hw_type(request, values["hw_type"])
    except FirmwareError as exc:
        errors["hw_type"] = exc.detail
    version = values["version"].strip()
    for check, value in ((library.check_version, version),
                         (library.check_release_notes, values["release_notes"])):
        try:
            check(value)
        except FirmwareError as exc:
            errors[exc.field or "_"] = exc.detail.split(": ", 1)[-1]
    if errors:
        return await _page(request, 400, values=values, errors=errors)
    assert content is not None
    the_driver = driver(request)
    try:
        await library.save_image(
            the_driver.db, the_driver.config_dir, _one(content), hw_type=hw_type,
            version=version, release_notes=values["release_notes"] or None,
        )
    except FirmwareError as exc:
        field = exc.field if exc.field in ("file", "hw_type", "version", "release_notes") else "_"
        return await _page(request, exc.status, values=values, errors={field: exc.detail})
    await _changed(request)
    return redirect("/firmware", notice="uploaded", version=version, hw_type=hw_type)


async def _image_or_404(request: web.Request) -> library.ImageView:
    try:
        hw_type = int(request.match_info["hw_type"])
    except ValueError:
        raise web.HTTPNotFound() from None
    image = await library.get_image(driver(request).db, hw_type, request.match_info["version"])
    if image is None:
        raise web.HTTPNotFound()
    return image


async def _delete_page(
    request: web.Request, image: library.ImageView, status: int = 200, error: str | None = None
) -> web.Response:
    campaign = (await _campaigns(request, [image]))[image.id]
    return page(
        request, "firmware_delete.html", status=status,
        title=f"Delete firmware {image.version}", image=image, campaign=campaign, error=error,
    )


@routes.get("/firmware/{hw_type}/{version}/delete")
async def delete_confirm(request: web.Request) -> web.Response:
    return await _delete_page(request, await _image_or_404(request))


@routes.post("/firmware/{hw_type}/{version}/delete")
async def delete(request: web.Request) -> web.Response:
    image = await _image_or_404(request)
    the_driver = driver(request)
    service = _service(request)
    try:
        if service is not None:
            await service.delete_image(image.hw_type, image.version)
        else:
            await library.delete_image(the_driver.db, the_driver.config_dir, image.hw_type,
                                       image.version)
    except FirmwareError as exc:
        return await _delete_page(request, image, exc.status, exc.detail)
    return redirect("/firmware", notice="fw_deleted", version=image.version, hw_type=image.hw_type)


@routes.post("/firmware/targets")
async def set_target(request: web.Request) -> web.Response:
    data = form(request)
    target_values = {"hw_type": data.get("hw_type", ""), "version": data.get("version", "")}
    try:
        hw_type = _hw_type(request, target_values["hw_type"])
        if data.get("action") == "clear":
            if not await library.clear_target(driver(request).db, hw_type=hw_type):
                raise FirmwareError(404, "not_found", f"hw_type {hw_type} has no firmware target",
                                    "target")
            await _changed(request)
            return redirect("/firmware", notice="target_cleared", hw_type=hw_type)
        version = target_values["version"]
        if not version:
            raise FirmwareError(400, "invalid_field", "choose a version", "target")
        await library.set_target(driver(request).db, version, hw_type=hw_type)
    except FirmwareError as exc:
        return await _page(
            request, exc.status, target_errors={target_values["hw_type"]: exc.detail}
        )
    await _changed(request)
    return redirect("/firmware", notice="target_set", hw_type=hw_type, version=version)
