"""Device endpoints (list, show, enroll, delete) and the device families with their commands.

Secrets never leave the driver: a device is shown with its identity, state and
last uplink only; the master secret and salt are write-only.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError

from driver_core.enrollment import EnrollmentError, add_device, delete_device, parse_device
from driver_core.family import Family
from driver_core.storage.models import Device, UplinkRecord
from driver_core.timefmt import zulu_millis

from .errors import ApiError, not_found
from .operation import DRIVER, Inputs, Link, Operation, Response
from .schemas import DEVICES_QUERY, SERIAL_PATH, device_body


def _families(request: web.Request) -> dict[int, Family]:
    return request.app[DRIVER].families


def device_json(device: Device, families: dict[int, Family]) -> dict[str, Any]:
    family = families.get(device.hw_type)
    return {
        "serial": device.serial,
        "name": device.name,
        "hw_type": device.hw_type,
        "model": family.hw_types.get(device.hw_type) if family else None,
        "family": family.domain if family else None,
        "firmware": device.firmware,
        "join_date": zulu_millis(device.join_date),
        "last_seen": zulu_millis(device.last_seen),
        "enrolled_at": zulu_millis(device.created_at),
    }


def device_detail_json(
    device: Device, families: dict[int, Family], uplink: UplinkRecord | None
) -> dict[str, Any]:
    body = device_json(device, families)
    body["sender_id"] = device.kid.hex()  # the OSCORE kid travels in clear: not a secret
    body["tx_interval"] = device.tx_interval
    body["last_uplink"] = (
        None
        if uplink is None
        else {
            "message_type": uplink.message_type,
            "received_at": zulu_millis(uplink.received_at),
            "data": uplink.data,
        }
    )
    return body


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def list_devices(request: web.Request, inputs: Inputs) -> web.Response:
    offset, limit = inputs.query["offset"], inputs.query["limit"]
    search = inputs.query.get("search") or ""
    query = select(Device)
    if search:
        pattern = _like(search)
        query = query.where(
            or_(
                Device.serial.ilike(pattern, escape="\\"),
                Device.name.ilike(pattern, escape="\\"),
            )
        )
    async with request.app[DRIVER].db.session() as session:
        total = await session.scalar(select(func.count()).select_from(query.subquery()))
        rows = await session.scalars(query.order_by(Device.serial).offset(offset).limit(limit))
        families = _families(request)
        items = [device_json(device, families) for device in rows]
    body: dict[str, Any] = {"items": items, "total": total, "offset": offset, "limit": limit}
    if search:
        body["search"] = search
    return web.json_response(body)


async def _detail(request: web.Request, serial: str) -> dict[str, Any]:
    async with request.app[DRIVER].db.session() as session:
        device = await session.scalar(select(Device).where(Device.serial == serial))
        if device is None:
            raise not_found(f"no device with serial {serial!r}")
        uplink = await session.scalar(
            select(UplinkRecord)
            .where(UplinkRecord.device_id == device.id)
            .order_by(UplinkRecord.received_at.desc(), UplinkRecord.id.desc())
            .limit(1)
        )
    return device_detail_json(device, _families(request), uplink)


async def get_device(request: web.Request, inputs: Inputs) -> web.Response:
    return web.json_response(await _detail(request, inputs.path["serial"]))


async def enroll_device(request: web.Request, inputs: Inputs) -> web.Response:
    driver = request.app[DRIVER]
    raw = {key: value for key, value in inputs.body.items() if value is not None}
    raw["hw_type"] = str(raw["hw_type"])
    try:
        device = parse_device(raw, driver.families)
    except EnrollmentError as exc:
        raise ApiError(400, "invalid_field", str(exc), exc.field) from None
    try:
        await add_device(driver.db, driver.box, device)
    except EnrollmentError as exc:
        raise ApiError(409, "already_enrolled", str(exc), exc.field) from None
    except IntegrityError:
        raise ApiError(
            409, "already_enrolled", f"{device.serial} or its sender_id is already enrolled"
        ) from None
    # The CoAP side may remember this kid as unknown for a few seconds: let it join now.
    driver.credentials.forget(device.sender_id)
    return web.json_response(await _detail(request, device.serial), status=201)


async def remove_device(request: web.Request, inputs: Inputs) -> web.Response:
    driver = request.app[DRIVER]
    serial = inputs.path["serial"]
    async with driver.db.session() as session:
        kid = await session.scalar(select(Device.kid).where(Device.serial == serial))
    if kid is None or not await delete_device(driver.db, serial):
        raise not_found(f"no device with serial {serial!r}")
    driver.credentials.forget(bytes(kid))
    return web.Response(status=204)


def families_json(families: dict[int, Family]) -> list[dict[str, Any]]:
    unique = {family.domain: family for family in families.values()}
    return [
        {
            "domain": family.domain,
            "name": family.name,
            "manufacturer": family.manufacturer,
            "hw_types": {str(code): text for code, text in sorted(family.hw_types.items())},
            "commands": [
                {
                    "name": spec.name,
                    "code": spec.code,
                    "kind": spec.kind,
                    "description": spec.description,
                    "hw_types": sorted(spec.hw_types or family.hw_types),
                    "parameter": spec.parameter_schema(),
                }
                for spec in family.commands.values()
            ],
        }
        for _, family in sorted(unique.items())
    ]


async def list_families(request: web.Request, inputs: Inputs) -> web.Response:
    return web.json_response({"items": families_json(_families(request))})


_BY_SERIAL = "$response.body#/serial"
_FOLLOW = {
    "GetDevice": Link("getDevice", {"serial": _BY_SERIAL}),
    "ScheduleDownlink": Link("scheduleDownlink", {"serial": _BY_SERIAL}),
    "ListDownlinks": Link("listDownlinks", {"serial": _BY_SERIAL}),
    "DeleteDevice": Link("deleteDevice", {"serial": _BY_SERIAL}),
}

OPERATIONS = [
    Operation(
        operation_id="listDevices",
        method="GET",
        path="/devices",
        handler=list_devices,
        summary="Enrolled devices",
        description="Devices ordered by serial number, one page at a time, optionally filtered.",
        tag="Devices",
        query=DEVICES_QUERY,
        responses={200: Response("One page of devices", "DevicePage")},
    ),
    Operation(
        operation_id="enrollDevice",
        method="POST",
        path="/devices",
        handler=enroll_device,
        summary="Enroll a device",
        description=(
            "Store a device and its OSCORE credentials so that it can JOIN. The secrets are "
            "stored encrypted and are never returned."
        ),
        tag="Devices",
        body=lambda driver: device_body(driver.families),
        body_example={
            "serial": "A0000001",
            "hw_type": 17,
            "sender_id": "a001",
            "master_secret": "0102030405060708090a0b0c0d0e0f10",
            "master_salt": "0101010101010101",
            "name": "Pump house",
        },
        responses={
            201: Response("The device is enrolled", "DeviceDetail", _FOLLOW),
            409: Response("The serial number or the sender_id is already enrolled", "Error"),
        },
    ),
    Operation(
        operation_id="getDevice",
        method="GET",
        path="/devices/{serial}",
        handler=get_device,
        summary="One device with its last uplink",
        tag="Devices",
        path_params=SERIAL_PATH,
        responses={
            200: Response("The device", "DeviceDetail"),
            404: Response("No device with this serial number", "Error"),
        },
    ),
    Operation(
        operation_id="deleteDevice",
        method="DELETE",
        path="/devices/{serial}",
        handler=remove_device,
        summary="Delete a device",
        description=(
            "Removes the device with its security context, uplink and downlink history. "
            "It can no longer communicate until enrolled again."
        ),
        tag="Devices",
        path_params=SERIAL_PATH,
        responses={
            204: Response("The device is deleted"),
            404: Response("No device with this serial number", "Error"),
        },
    ),
    Operation(
        operation_id="listDeviceFamilies",
        method="GET",
        path="/device-families",
        handler=list_families,
        summary="Device families with their commands",
        description=(
            "Each family once, with its device types and the commands and configurations a "
            "downlink can carry, each with the JSON schema of its parameter."
        ),
        tag="Devices",
        responses={200: Response("The device families", "DeviceFamilyList")},
    ),
]
