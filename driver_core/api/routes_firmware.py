"""Firmware endpoints: upload, list, show with campaign counts, delete, targets, per-device status.

An image is named by (hw_type, version). Upload it as the raw body
(application/octet-stream, with hw_type and version in the query) or as a
multipart form (fields file, hw_type, version, release_notes); the body is
streamed to disk and hashed on the way, so its size is limited only by
MAX_IMAGE_BYTES, not by the API's JSON body limit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import voluptuous as vol
from aiohttp import BodyPartReader, web

from driver_core.fota import library
from driver_core.fota.library import (
    MAX_IMAGE_BYTES,
    RELEASE_NOTES_MAX,
    STATES,
    VERSION_PATTERN,
    FirmwareError,
)
from driver_core.fota.models import VERSION_MAX

from .errors import ApiError
from .operation import DRIVER, Inputs, Link, Operation, Response
from .schemas import SERIAL_PATH, FullMatch, _query_integer, _text, validate

if TYPE_CHECKING:
    from driver_core.driver import Driver
    from driver_core.fota.service import FotaService

CHUNK = 65536
FIELD_MAX = RELEASE_NOTES_MAX * 4  # bytes of one multipart text field

HW_TYPE = vol.All(
    _query_integer, vol.Range(min=0, max=65535), msg="must be an integer from 0 to 65535"
)
VERSION = vol.All(
    _text,
    FullMatch(VERSION_PATTERN),
    msg=f"must be 1 to {VERSION_MAX} characters of A-Z a-z 0-9 . _ + - starting with a letter "
    "or digit",
)
QUERY_NOTES_MAX = 500  # a URL stays under aiohttp's 8190-byte request line


def _upload_fields(notes_max: int) -> vol.Schema:
    return vol.Schema(
        {
            vol.Optional("hw_type", description="Device type the image is for (required)"):
                HW_TYPE,
            vol.Optional(
                "version", description="Firmware version, as devices report it (required)"
            ): VERSION,
            vol.Optional("release_notes", description="Free text shown with the image"): vol.All(
                _text, vol.Length(max=notes_max), msg=f"must be at most {notes_max} characters"
            ),
        },
        extra=vol.REMOVE_EXTRA,
    )


UPLOAD_QUERY = _upload_fields(QUERY_NOTES_MAX)  # raw uploads
UPLOAD_FORM = _upload_fields(RELEASE_NOTES_MAX)  # multipart uploads
LIST_QUERY = vol.Schema(
    {vol.Optional("hw_type", description="Only images for this device type"): HW_TYPE},
    extra=vol.REMOVE_EXTRA,
)
IMAGE_PATH = vol.Schema(
    {
        vol.Required("hw_type", description="Device type"): HW_TYPE,
        vol.Required("version", description="Firmware version"): VERSION,
    }
)
HW_TYPE_PATH = vol.Schema({vol.Required("hw_type", description="Device type"): HW_TYPE})
TARGET_BODY = vol.Schema(
    {
        vol.Required(
            "version",
            description="Version of an uploaded image for the device type (of the device)",
        ): VERSION,
    }
)

_TIME = {"type": "string", "format": "date-time", "nullable": True}
_COUNT = {"type": "integer", "minimum": 0}
SCHEMAS: dict[str, dict[str, Any]] = {
    "FirmwareImage": {
        "type": "object",
        "required": [
            "hw_type", "version", "size", "sha256", "etag", "release_notes", "uploaded_at",
        ],
        "properties": {
            "hw_type": {"type": "integer"},
            "version": {"type": "string"},
            "size": {"type": "integer", "description": "Bytes"},
            "sha256": {"type": "string", "description": "SHA-256 of the image, hex"},
            "etag": {
                "type": "string",
                "description": "CoAP ETag of the download: the first 8 bytes of the SHA-256, hex",
            },
            "release_notes": {"type": "string", "nullable": True},
            "uploaded_at": {**_TIME, "nullable": False},
        },
    },
    "FirmwareImageList": {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/FirmwareImage"}}
        },
    },
    "FirmwareCampaign": {
        "type": "object",
        "description": "Devices per update state for this image; targeted: devices whose target "
        "it is; up_to_date: those of them reporting its version",
        "required": [*STATES, "targeted", "up_to_date"],
        "properties": {name: _COUNT for name in (*STATES, "targeted", "up_to_date")},
    },
    "FirmwareImageDetail": {
        "allOf": [
            {"$ref": "#/components/schemas/FirmwareImage"},
            {
                "type": "object",
                "required": ["campaign"],
                "properties": {"campaign": {"$ref": "#/components/schemas/FirmwareCampaign"}},
            },
        ]
    },
    "FirmwareTarget": {
        "type": "object",
        "required": ["scope", "hw_type", "serial", "version"],
        "properties": {
            "scope": {"type": "string", "enum": ["hw_type", "device"]},
            "hw_type": {"type": "integer"},
            "serial": {"type": "string", "nullable": True, "description": "Device targets only"},
            "version": {"type": "string"},
        },
    },
    "FirmwareTargetList": {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/FirmwareTarget"}}
        },
    },
    "FirmwareUpdate": {
        "type": "object",
        "nullable": True,
        "description": "The device's latest update (null before the first offer)",
        "required": [
            "version", "state", "from_version", "size", "block_size", "blocks",
            "received_bytes", "percent", "attempts", "offered_at", "started_at",
            "last_block_at", "finished_at", "error",
        ],
        "properties": {
            "version": {"type": "string"},
            "state": {"type": "string", "enum": list(STATES)},
            "from_version": {"type": "string", "nullable": True},
            "size": {"type": "integer"},
            "block_size": {"type": "integer", "nullable": True},
            "blocks": {"type": "integer", "description": "Blocks served (retries included)"},
            "received_bytes": {"type": "integer", "description": "Distinct bytes served"},
            "percent": {"type": "integer", "minimum": 0, "maximum": 100},
            "attempts": {"type": "integer", "description": "Offers after failures, plus one"},
            "offered_at": _TIME,
            "started_at": _TIME,
            "last_block_at": _TIME,
            "finished_at": {**_TIME, "description": "Downloaded, installed or failed"},
            "error": {"type": "string", "nullable": True},
        },
    },
    "FirmwareStatus": {
        "type": "object",
        "required": ["serial", "hw_type", "firmware", "target", "target_scope", "update"],
        "properties": {
            "serial": {"type": "string"},
            "hw_type": {"type": "integer"},
            "firmware": {"type": "string", "nullable": True, "description": "From the last JOIN"},
            "target": {"type": "string", "nullable": True},
            "target_scope": {"type": "string", "nullable": True, "enum": ["hw_type", "device", None]},
            "update": {"$ref": "#/components/schemas/FirmwareUpdate"},
        },
    },
}

UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "description": f"The image, at most {MAX_IMAGE_BYTES} bytes",
    "content": {
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "hw_type", "version"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "hw_type": {"type": "integer", "minimum": 0, "maximum": 65535},
                    "version": {"type": "string", "pattern": VERSION_PATTERN},
                    "release_notes": {"type": "string", "maxLength": RELEASE_NOTES_MAX},
                },
            },
        },
    },
}


def _driver(request: web.Request) -> Driver:
    return request.app[DRIVER]


def _service(request: web.Request) -> FotaService | None:
    return getattr(_driver(request), "fota", None)


async def _changed(request: web.Request) -> None:
    """Images or targets changed: the running service sees it at once."""
    service = _service(request)
    if service is not None:
        await service.reload()


def _supported(request: web.Request, hw_type: int) -> int:
    families = _driver(request).families
    if hw_type not in families:
        listed = ", ".join(str(code) for code in sorted(families))
        raise ApiError(
            400, "invalid_field", f"hw_type: must be one of the supported types: {listed}",
            "hw_type",
        )
    return hw_type


# --- upload ------------------------------------------------------------------------------------


async def _raw_chunks(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        yield chunk


async def _read_multipart(request: web.Request) -> tuple[dict[str, str], library.Received | None]:
    """Text fields and the received file of a multipart upload (the file streamed to disk)."""
    config_dir = _driver(request).config_dir
    fields: dict[str, str] = {}
    received: library.Received | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                raise ApiError(400, "invalid_body", "nested or unnamed multipart parts are not accepted")
            if part.name == "file":
                if received is not None:
                    raise ApiError(400, "invalid_body", "more than one file part", "file")
                received = await library.receive_image(config_dir, _part_chunks(part))
            else:
                raw = await part.read_chunk(FIELD_MAX + 1)
                if len(raw) > FIELD_MAX:
                    raise ApiError(400, "invalid_field", f"{part.name}: too long", part.name)
                try:
                    fields[part.name] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ApiError(
                        400, "invalid_field", f"{part.name}: not UTF-8 text", part.name
                    ) from None
    except (ApiError, FirmwareError):
        if received is not None:
            received.discard()
        raise
    except Exception as exc:  # malformed multipart: aiohttp raises assorted types
        if received is not None:
            received.discard()
        raise ApiError(400, "invalid_body", f"the multipart body cannot be read: {exc}") from None
    return fields, received


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK):
        yield chunk


def _checked_upload_fields(schema: vol.Schema, values: dict[str, Any], where: str) -> dict[str, Any]:
    fields = validate(schema, values, where)
    for name in ("hw_type", "version"):
        if name not in fields:
            raise ApiError(400, "invalid_field", f"{name}: required", name)
    return fields


async def upload_firmware(request: web.Request, inputs: Inputs) -> web.Response:
    driver = _driver(request)
    if request.content_type == "multipart/form-data":
        form, received = await _read_multipart(request)
        try:
            fields = _checked_upload_fields(UPLOAD_FORM, {**inputs.query, **form}, "body")
            _supported(request, fields["hw_type"])
            if received is None:
                raise ApiError(400, "invalid_field", "file: required (the image)", "file")
        except BaseException:
            if received is not None:
                received.discard()
            raise
    elif request.content_type == "application/octet-stream":
        fields = _checked_upload_fields(UPLOAD_QUERY, inputs.query, "query")
        _supported(request, fields["hw_type"])
        library.check_version(fields["version"])
        if await library.get_image(driver.db, fields["hw_type"], fields["version"]) is not None:
            raise library.exists_error(fields["hw_type"], fields["version"])
        received = await library.receive_image(driver.config_dir, _raw_chunks(request))
    else:
        got = request.content_type if request.headers.get("Content-Type") else "no Content-Type"
        raise ApiError(
            415, "unsupported_media_type",
            f"send the image as application/octet-stream or multipart/form-data (got {got})",
        )
    image = await library.add_image(
        driver.db, driver.config_dir, received, hw_type=fields["hw_type"],
        version=fields["version"], release_notes=fields.get("release_notes"),
    )
    await _changed(request)
    return web.json_response(image.as_json(), status=201)


# --- library -----------------------------------------------------------------------------------


async def list_firmware(request: web.Request, inputs: Inputs) -> web.Response:
    images = await library.list_images(_driver(request).db, inputs.query.get("hw_type"))
    return web.json_response({"items": [image.as_json() for image in images]})


async def get_firmware(request: web.Request, inputs: Inputs) -> web.Response:
    db = _driver(request).db
    image = await library.require_image(db, inputs.path["hw_type"], inputs.path["version"])
    service = _service(request)
    if service is not None:
        counts = await service.campaign(image)
    else:
        counts = await library.campaign_counts(db, image)
    return web.json_response({**image.as_json(), "campaign": counts})


async def delete_firmware(request: web.Request, inputs: Inputs) -> web.Response:
    hw_type, version = inputs.path["hw_type"], inputs.path["version"]
    service = _service(request)
    if service is not None:
        await service.delete_image(hw_type, version)
    else:
        driver = _driver(request)
        await library.delete_image(driver.db, driver.config_dir, hw_type, version)
    return web.Response(status=204)


# --- targets -----------------------------------------------------------------------------------


async def list_targets(request: web.Request, inputs: Inputs) -> web.Response:
    targets = await library.list_targets(_driver(request).db)
    return web.json_response({"items": [target.as_json() for target in targets]})


async def set_hw_type_target(request: web.Request, inputs: Inputs) -> web.Response:
    hw_type = inputs.path["hw_type"]
    if hw_type not in _driver(request).families:
        raise ApiError(404, "not_found", f"no device family supports hw_type {hw_type}")
    target = await library.set_target(_driver(request).db, inputs.body["version"], hw_type=hw_type)
    await _changed(request)
    return web.json_response(target.as_json())


async def clear_hw_type_target(request: web.Request, inputs: Inputs) -> web.Response:
    hw_type = inputs.path["hw_type"]
    if not await library.clear_target(_driver(request).db, hw_type=hw_type):
        raise ApiError(404, "not_found", f"hw_type {hw_type} has no firmware target")
    await _changed(request)
    return web.Response(status=204)


async def set_device_target(request: web.Request, inputs: Inputs) -> web.Response:
    serial = inputs.path["serial"]
    target = await library.set_target(_driver(request).db, inputs.body["version"], serial=serial)
    await _changed(request)
    return web.json_response(target.as_json())


async def clear_device_target(request: web.Request, inputs: Inputs) -> web.Response:
    serial = inputs.path["serial"]
    if not await library.clear_target(_driver(request).db, serial=serial):
        raise ApiError(404, "not_found", f"device {serial} has no firmware target of its own")
    await _changed(request)
    return web.Response(status=204)


async def device_firmware(request: web.Request, inputs: Inputs) -> web.Response:
    serial = inputs.path["serial"]
    service = _service(request)
    if service is not None:
        status = await service.device_status(serial)
    else:
        status = await library.device_status(_driver(request).db, serial)
    return web.json_response(status)


_IMAGE_LINKS = {
    "GetFirmware": Link(
        "getFirmware",
        {"hw_type": "$response.body#/hw_type", "version": "$response.body#/version"},
    ),
    "DeleteFirmware": Link(
        "deleteFirmware",
        {"hw_type": "$response.body#/hw_type", "version": "$response.body#/version"},
    ),
}
_NO_IMAGE = Response("No such image", "Error")

OPERATIONS = [
    Operation(
        operation_id="uploadFirmware",
        method="POST",
        path="/firmware",
        handler=upload_firmware,
        summary="Upload a firmware image",
        description=(
            "The body is the image: either raw (application/octet-stream) with hw_type, version "
            "and optionally release_notes in the query, or a multipart form with the fields "
            "file, hw_type, version and release_notes. The SHA-256 is computed on upload. "
            "A version exists once per hw_type."
        ),
        tag="Firmware",
        query=UPLOAD_QUERY,
        raw_body=UPLOAD_BODY,
        responses={
            201: Response("The image is in the library", "FirmwareImage", _IMAGE_LINKS),
            409: Response("This hw_type already has an image with this version", "Error"),
            413: Response(f"The image is larger than {MAX_IMAGE_BYTES} bytes", "Error"),
            415: Response("The body is neither application/octet-stream nor multipart", "Error"),
        },
    ),
    Operation(
        operation_id="listFirmware",
        method="GET",
        path="/firmware",
        handler=list_firmware,
        summary="Firmware images in the library",
        tag="Firmware",
        query=LIST_QUERY,
        responses={200: Response("The images, by hw_type then upload time", "FirmwareImageList")},
    ),
    Operation(
        operation_id="getFirmware",
        method="GET",
        path="/firmware/{hw_type}/{version}",
        handler=get_firmware,
        summary="One image with its campaign counts",
        description="Counts of devices per update state for this image (the campaign view).",
        tag="Firmware",
        path_params=IMAGE_PATH,
        responses={200: Response("The image", "FirmwareImageDetail"), 404: _NO_IMAGE},
    ),
    Operation(
        operation_id="deleteFirmware",
        method="DELETE",
        path="/firmware/{hw_type}/{version}",
        handler=delete_firmware,
        summary="Delete an image",
        description=(
            "Refused (409) while a device is downloading it. Its targets are removed with it."
        ),
        tag="Firmware",
        path_params=IMAGE_PATH,
        responses={
            204: Response("The image is deleted"),
            404: _NO_IMAGE,
            409: Response("A device is downloading the image", "Error"),
        },
    ),
    Operation(
        operation_id="listFirmwareTargets",
        method="GET",
        path="/firmware-targets",
        handler=list_targets,
        summary="Firmware targets of device types and devices",
        tag="Firmware",
        responses={200: Response("The targets", "FirmwareTargetList")},
    ),
    Operation(
        operation_id="setHwTypeFirmwareTarget",
        method="PUT",
        path="/firmware-targets/hw-types/{hw_type}",
        handler=set_hw_type_target,
        summary="Make an image the target of every device of a type",
        description=(
            "Devices of this type reporting another version are offered the image when they "
            "next ask (POST /fota); a device's own target takes precedence."
        ),
        tag="Firmware",
        path_params=HW_TYPE_PATH,
        body=TARGET_BODY,
        body_example={"version": "2.1.0"},
        responses={
            200: Response("The target", "FirmwareTarget"),
            404: Response("No such hw_type or no image of this version for it", "Error"),
        },
    ),
    Operation(
        operation_id="clearHwTypeFirmwareTarget",
        method="DELETE",
        path="/firmware-targets/hw-types/{hw_type}",
        handler=clear_hw_type_target,
        summary="Stop updating a device type",
        tag="Firmware",
        path_params=HW_TYPE_PATH,
        responses={
            204: Response("The target is removed"),
            404: Response("The hw_type has no target", "Error"),
        },
    ),
    Operation(
        operation_id="setDeviceFirmwareTarget",
        method="PUT",
        path="/devices/{serial}/firmware-target",
        handler=set_device_target,
        summary="Make an image the target of one device",
        tag="Firmware",
        path_params=SERIAL_PATH,
        body=TARGET_BODY,
        body_example={"version": "2.1.0"},
        responses={
            200: Response("The target", "FirmwareTarget"),
            404: Response("No such device or no image of this version for its hw_type", "Error"),
        },
    ),
    Operation(
        operation_id="clearDeviceFirmwareTarget",
        method="DELETE",
        path="/devices/{serial}/firmware-target",
        handler=clear_device_target,
        summary="Remove a device's own target (its hw_type's applies again)",
        tag="Firmware",
        path_params=SERIAL_PATH,
        responses={
            204: Response("The target is removed"),
            404: Response("No such device, or it has no target of its own", "Error"),
        },
    ),
    Operation(
        operation_id="getDeviceFirmware",
        method="GET",
        path="/devices/{serial}/firmware",
        handler=device_firmware,
        summary="Firmware and update status of a device",
        tag="Firmware",
        path_params=SERIAL_PATH,
        responses={
            200: Response("The device's firmware status", "FirmwareStatus"),
            404: Response("No device with this serial number", "Error"),
        },
    ),
]
