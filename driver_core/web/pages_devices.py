"""Devices list and the device page: Overview, Uplinks (live), Commands (live), delete."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from driver_core.downlinks import PENDING, STATE_NAMES, DownlinkError, DownlinkView
from driver_core.enrollment import delete_device
from driver_core.family import CHARSETS, CommandSpec
from driver_core.storage.models import Device
from driver_core.uplink import Uplink

from . import live
from .context import SESSION, ctx, driver, form, page, redirect
from .devices_view import (
    PAGE_SIZES,
    SORTS,
    STATUS_LABELS,
    data_items,
    device_page,
    find_device,
    summary,
    uplink_history,
)
from .pages_firmware import device_firmware

routes = web.RouteTableDef()
HISTORY_PER_PAGE = 50


@routes.get("/devices")
async def devices(request: web.Request) -> web.Response:
    listing = await device_page(driver(request), dict(request.query))
    return page(
        request,
        "devices.html",
        title="Devices",
        listing=listing,
        sorts=list(SORTS),
        page_sizes=PAGE_SIZES,
        status_labels=STATUS_LABELS,
    )


async def _device_or_404(request: web.Request) -> Device:
    device = await find_device(driver(request), request.match_info["serial"])
    if device is None:
        raise web.HTTPNotFound()
    return device


def _page_number(request: web.Request) -> int:
    try:
        return max(1, int(request.query.get("page", "1")))
    except ValueError:
        return 1


async def _device_page(
    request: web.Request, device: Device, tab: str, status: int = 200, **values: Any
) -> web.Response:
    info = await summary(driver(request), device)
    return page(
        request,
        f"device_{tab}.html",
        status=status,
        title=f"Device {device.serial}",
        tab=tab,
        info=info,
        status_labels=STATUS_LABELS,
        **values,
    )


@routes.get("/devices/{serial}")
async def overview(request: web.Request) -> web.Response:
    device = await _device_or_404(request)
    fw = await device_firmware(driver(request), device.serial)
    return await _device_page(request, device, "overview", fw=fw)


@routes.get("/devices/{serial}/uplinks")
async def uplinks(request: web.Request) -> web.Response:
    device = await _device_or_404(request)
    number = _page_number(request)
    rows, total = await uplink_history(driver(request), device, number)
    items = [
        {"received_at": r.received_at, "message_type": r.message_type, "data": r.data}
        for r in rows
    ]
    return await _device_page(
        request, device, "uplinks", uplinks=items, total=total, number=number,
        pages=max(1, -(-total // 50)),
    )


# --- commands ---------------------------------------------------------------------------------


def command_choices(request: web.Request, device: Device) -> list[dict[str, Any]]:
    """The family's commands and configurations for this hw_type, with what each accepts."""
    family = driver(request).families.get(device.hw_type)
    specs: list[CommandSpec] = family.commands_for(device.hw_type) if family else []
    choices = []
    for spec in sorted(specs, key=lambda s: (s.kind != "command", s.name)):
        schema = spec.parameter_schema()
        choices.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "description": spec.description,
                "accepts": accepts(spec),
                "default": "1" if spec.kind == "command" else str(schema.get("default", "")),
                "schema": schema,
            }
        )
    return choices


def accepts(spec: CommandSpec) -> str:
    """What the parameter may be, in words (shown next to the field, JS or not)."""
    if spec.kind == "command":
        return "command: parameter 1"
    unit = f" {spec.unit}" if spec.unit else ""
    if spec.type == "str":
        high = spec.max_length if spec.max_length is not None else "any"
        return f"text, {spec.min_length or 0} to {high} characters, {CHARSETS[spec.charset][0]}"
    if spec.options:
        return "one of " + ", ".join(f"{code} ({label})" for code, label in spec.options.items())
    step = f", step {spec.step}" if spec.step != 1 else ""
    return f"{spec.minimum} to {spec.maximum}{unit}{step}"


async def _commands_page(
    request: web.Request,
    device: Device,
    status: int = 200,
    values: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    notice: str | None = None,
) -> web.Response:
    number = _page_number(request)
    history, total = await driver(request).downlinks.history(
        device.serial, (number - 1) * HISTORY_PER_PAGE, HISTORY_PER_PAGE
    )
    return await _device_page(
        request,
        device,
        "commands",
        status=status,
        choices=command_choices(request, device),
        history=history,
        total=total,
        number=number,
        pages=max(1, -(-total // HISTORY_PER_PAGE)),
        values=values or {"parameter": "1"},
        errors=errors or {},
        state_names=STATE_NAMES,
        pending=PENDING,
        notice=notice,
    )


@routes.get("/devices/{serial}/commands")
async def commands(request: web.Request) -> web.Response:
    return await _commands_page(request, await _device_or_404(request))


@routes.post("/devices/{serial}/commands")
async def schedule(request: web.Request) -> web.Response:
    device = await _device_or_404(request)
    data = form(request)
    command = data.get("command", "")
    parameter = data.get("parameter", "")
    values = {"command": command, "parameter": parameter}
    if not command:
        return await _commands_page(
            request, device, 400, values, {"command": "choose a command or configuration"}
        )
    if parameter.strip() == "":
        return await _commands_page(
            request, device, 400, values, {"parameter": "enter a value (for commands: 1)"}
        )
    try:
        # The family's validator reads numbers from text itself ("60"), and keeps text for text.
        await driver(request).downlinks.schedule(device.serial, command, parameter)
    except DownlinkError as exc:
        field = exc.field if exc.field in ("command", "parameter") else "_"
        return await _commands_page(request, device, exc.status, values, {field: exc.detail})
    return redirect(f"/devices/{device.serial}/commands", notice="scheduled", command=command)


@routes.post("/devices/{serial}/cancel")
async def cancel(request: web.Request) -> web.Response:
    device = await _device_or_404(request)
    command_id = form(request).get("command_id", "")
    try:
        view = await driver(request).downlinks.get(command_id)
        if view.serial != device.serial:
            raise DownlinkError(404, "not_found", f"no downlink {command_id!r} for this device")
        await driver(request).downlinks.cancel(command_id)
    except DownlinkError as exc:
        return await _commands_page(request, device, exc.status, errors={"_": exc.detail})
    return redirect(f"/devices/{device.serial}/commands", notice="canceled", command_id=command_id)


# --- live -------------------------------------------------------------------------------------


@routes.get("/devices/{serial}/events")
async def events(request: web.Request) -> web.StreamResponse:
    device = await _device_or_404(request)
    context = ctx(request)
    rows = context.env.get_template("rows.html").module
    csrf = request[SESSION].csrf
    hw_type = device.hw_type

    async def render(kind: str, event: Any) -> dict[str, Any] | None:
        if kind == "fota":
            fw = await device_firmware(context.driver, device.serial)
            return {"html": str(rows.firmware_status(fw))}  # type: ignore[attr-defined]
        if kind == "uplink":
            uplink: Uplink = event
            item = {
                "received_at": uplink.rx_date,
                "message_type": uplink.message_type,
                "data": uplink.data,
            }
            data: dict[str, Any] = {"row": str(rows.uplink_row(item))}  # type: ignore[attr-defined]
            if uplink.message_type == "rx":
                items = data_items(context.driver, hw_type, uplink.data)
                data["latest"] = str(rows.latest_data(items, uplink.rx_date))  # type: ignore[attr-defined]
            data["last_seen"] = str(rows.moment(uplink.rx_date))  # type: ignore[attr-defined]
            return data
        view: DownlinkView = event
        return {
            "command_id": view.command_id,
            "row": str(
                rows.downlink_row(view, device.serial, csrf, STATE_NAMES, PENDING)  # type: ignore[attr-defined]
            ),
        }

    return await live.serve(request, context.hub, device.serial, render)


# --- delete -----------------------------------------------------------------------------------


@routes.get("/devices/{serial}/delete")
async def delete_confirm(request: web.Request) -> web.Response:
    device = await _device_or_404(request)
    return page(request, "device_delete.html", title=f"Delete {device.serial}", device=device)


@routes.post("/devices/{serial}/delete")
async def delete(request: web.Request) -> web.Response:
    device = await _device_or_404(request)
    the_driver = driver(request)
    if form(request).get("confirm_serial", "").strip() != device.serial:
        return page(
            request, "device_delete.html", status=400, title=f"Delete {device.serial}",
            device=device, error=f"type {device.serial} to confirm",
        )
    if await delete_device(the_driver.db, device.serial):
        the_driver.credentials.forget(bytes(device.kid))
    return redirect("/devices", notice="deleted", serial=device.serial)


