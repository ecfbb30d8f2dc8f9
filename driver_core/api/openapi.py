"""The OpenAPI 3.0 document of the REST API, built from the declared operations.

Request schemas (path, query, body) are converted from the voluptuous schemas
the server validates with; response schemas are declared once below. 3.0 and
not 3.1 because the bundled Swagger UI (4.15) renders 3.0 only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import voluptuous as vol
import voluptuous_openapi

from driver_core.downlinks import STATE_NAMES

from .operation import API_PREFIX, Operation, Response
from .routes_firmware import SCHEMAS as FIRMWARE_SCHEMAS

if TYPE_CHECKING:
    from driver_core.driver import Driver

OPENAPI_VERSION = "3.0.3"
API_VERSION = "1.0.0"

_TIME = {
    "type": "string",
    "format": "date-time",
    "nullable": True,
    "example": "2025-08-01T15:20:24.000Z",
}
_UPLINK = {
    "type": "object",
    "nullable": True,
    "description": "The latest message from the device (null before the first)",
    "required": ["message_type", "received_at", "data"],
    "properties": {
        "message_type": {"type": "string", "example": "rx"},
        "received_at": {**_TIME, "nullable": False},
        "data": {"type": "object", "additionalProperties": True},
    },
}
_STATES = "; ".join(f"{code} {name}" for code, name in STATE_NAMES.items())

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {
                "type": "string",
                "description": "Machine-readable code, e.g. unauthorized, invalid_field, "
                "invalid_json, invalid_command, invalid_parameter, not_found, conflict, "
                "not_pending",
            },
            "detail": {"type": "string", "description": "What is wrong, for a human"},
            "field": {"type": "string", "description": "The input at fault, when there is one"},
        },
    },
    "Downlink": {
        "type": "object",
        "required": [
            "command_id", "serial", "command", "code", "parameter", "state", "state_name",
            "downlink_id", "callback_url", "result", "inserted_at", "dispatched_at",
            "acknowledged_at", "canceled_at", "unacknowledged_at",
        ],
        "properties": {
            "command_id": {"type": "string", "maxLength": 128},
            "serial": {"type": "string"},
            "command": {"type": "string"},
            "code": {"type": "integer", "description": "Command code sent to the device"},
            "parameter": {
                "description": "The value sent to the device",
                "nullable": True,
                "anyOf": [{"type": "integer"}, {"type": "string"}],
            },
            "state": {
                "type": "integer",
                "enum": list(STATE_NAMES),
                "description": f"Downlink state: {_STATES}",
            },
            "state_name": {"type": "string", "enum": list(STATE_NAMES.values())},
            "downlink_id": {
                "type": "integer",
                "minimum": 1,
                "maximum": 65535,
                "description": "Identifier used on the wire with the device",
            },
            "callback_url": {"type": "string", "nullable": True},
            "result": {
                "type": "integer",
                "nullable": True,
                "description": "Result code of the device's acknowledgement (0: accepted)",
            },
            "inserted_at": {**_TIME, "nullable": False},
            "dispatched_at": _TIME,
            "acknowledged_at": {**_TIME, "description": "Acknowledged or refused (3 or 4)"},
            "canceled_at": _TIME,
            "unacknowledged_at": {**_TIME, "description": "Declared not acknowledged (5)"},
        },
    },
    "DownlinkPage": {
        "type": "object",
        "required": ["items", "total", "offset", "limit"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Downlink"}},
            "total": {"type": "integer", "description": "Number of downlinks in all pages"},
            "offset": {"type": "integer"},
            "limit": {"type": "integer"},
        },
    },
    "Device": {
        "type": "object",
        "required": [
            "serial", "name", "hw_type", "model", "family", "firmware", "join_date",
            "last_seen", "enrolled_at",
        ],
        "properties": {
            "serial": {"type": "string"},
            "name": {"type": "string", "nullable": True},
            "hw_type": {"type": "integer"},
            "model": {"type": "string", "nullable": True, "description": "Name of the hw_type"},
            "family": {
                "type": "string",
                "nullable": True,
                "description": "Domain of the device family",
            },
            "firmware": {"type": "string", "nullable": True},
            "join_date": {**_TIME, "description": "Last JOIN"},
            "last_seen": {**_TIME, "description": "Last message from the device"},
            "enrolled_at": {**_TIME, "nullable": False},
        },
    },
    "DeviceDetail": {
        "allOf": [
            {"$ref": "#/components/schemas/Device"},
            {
                "type": "object",
                "required": ["sender_id", "tx_interval", "last_uplink"],
                "properties": {
                    "sender_id": {"type": "string", "description": "OSCORE Sender ID, hex"},
                    "tx_interval": {"type": "integer", "description": "Minutes"},
                    "last_uplink": _UPLINK,
                },
            },
        ]
    },
    "DevicePage": {
        "type": "object",
        "required": ["items", "total", "offset", "limit"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}},
            "total": {"type": "integer"},
            "offset": {"type": "integer"},
            "limit": {"type": "integer"},
            "search": {"type": "string"},
        },
    },
    "Command": {
        "type": "object",
        "required": ["name", "code", "kind", "description", "hw_types", "parameter"],
        "properties": {
            "name": {"type": "string", "example": "tx_interval"},
            "code": {"type": "integer"},
            "kind": {"type": "string", "enum": ["command", "configuration"]},
            "description": {"type": "string"},
            "hw_types": {
                "type": "array",
                "items": {"type": "integer"},
                "description": "Device types that accept it",
            },
            "parameter": {
                "type": "object",
                "additionalProperties": True,
                "description": "JSON schema of the parameter (with unit, step and option "
                "labels where they apply)",
            },
        },
    },
    "DeviceFamily": {
        "type": "object",
        "required": ["domain", "name", "manufacturer", "hw_types", "commands"],
        "properties": {
            "domain": {"type": "string"},
            "name": {"type": "string"},
            "manufacturer": {"type": "string"},
            "hw_types": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "hw_type code -> description",
            },
            "commands": {"type": "array", "items": {"$ref": "#/components/schemas/Command"}},
        },
    },
    "DeviceFamilyList": {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/DeviceFamily"}}
        },
    },
}

# Errors every operation of a kind can answer, added to its declared responses.
_ERRORS = {
    400: "Invalid input: the detail says why and the field names the input at fault",
    401: "Missing or invalid bearer token",
    404: "Not found",
    413: "The request body is too large",
    415: "The request body is not application/json",
    429: "Too many failed authentications from this address; retry after Retry-After seconds",
    500: "Unexpected error (details in the driver log)",
}
_RETRY_AFTER = {
    "description": "Seconds until this address may fail to authenticate again",
    "schema": {"type": "integer", "minimum": 1},
}


def convert(schema: vol.Schema) -> dict[str, Any]:
    """voluptuous-openapi's conversion, plus the refusal of unknown keys it leaves out."""
    converted = voluptuous_openapi.convert(schema)
    if schema.extra == vol.PREVENT_EXTRA and converted.get("type") == "object":
        converted["additionalProperties"] = False
    return converted


def _parameters(schema: vol.Schema | None, location: str) -> list[dict[str, Any]]:
    if schema is None:
        return []
    converted = convert(schema)
    required = set(converted.get("required", ()))
    parameters = []
    for name, prop in converted["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", None)
        parameter: dict[str, Any] = {
            "name": name,
            "in": location,
            "required": location == "path" or name in required,
            "schema": prop,
        }
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _response(declared: Response) -> dict[str, Any]:
    response: dict[str, Any] = {"description": declared.description}
    if declared.schema is not None:
        response["content"] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{declared.schema}"}}
        }
    if declared.links:
        response["links"] = {
            name: {"operationId": link.operation_id, "parameters": dict(link.parameters)}
            for name, link in declared.links.items()
        }
    return response


def _operation(op: Operation, driver: Driver) -> dict[str, Any]:
    body = op.body_schema(driver)
    entry: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
    }
    if op.description:
        entry["description"] = op.description
    parameters = _parameters(op.path_params, "path") + _parameters(op.query, "query")
    if parameters:
        entry["parameters"] = parameters
    if body is not None:
        media: dict[str, Any] = {"schema": convert(body)}
        if op.body_example is not None:
            media["example"] = op.body_example
        entry["requestBody"] = {"required": True, "content": {"application/json": media}}
    elif op.raw_body is not None:
        entry["requestBody"] = op.raw_body
    responses = {str(status): _response(response) for status, response in op.responses.items()}
    implied = [401, 429, 500]
    if parameters or body is not None or op.raw_body is not None:
        implied.append(400)
    if op.path_params is not None:
        implied.append(404)
    if body is not None or op.raw_body is not None:
        implied += [413, 415]
    for status in implied:
        responses.setdefault(str(status), _response(Response(_ERRORS[status], "Error")))
    responses["429"].setdefault("headers", {"Retry-After": _RETRY_AFTER})
    entry["responses"] = dict(sorted(responses.items()))
    return entry


def build_document(operations: Iterable[Operation], driver: Driver) -> dict[str, Any]:
    """The OpenAPI document for ``operations`` as served by ``driver``."""
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, driver)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "coap-driver REST API",
            "version": API_VERSION,
            "description": (
                "Schedule and follow downlinks, manage devices. Every endpoint requires "
                "`Authorization: Bearer <token>`; create a token with "
                "`coap-driver token create NAME`. Timestamps are UTC, ISO 8601."
            ),
        },
        "servers": [{"url": API_PREFIX}],
        "tags": [
            {"name": "Downlinks", "description": "Commands and configurations for devices"},
            {"name": "Devices", "description": "Enrolled devices and device families"},
            {"name": "Firmware", "description": "Firmware images, targets and update campaigns"},
        ],
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, **FIRMWARE_SCHEMAS},
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `coap-driver token create NAME`",
                }
            },
        },
        "security": [{"bearerAuth": []}],
    }
