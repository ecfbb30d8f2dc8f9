"""Downlink endpoints: schedule, follow, cancel (docs/mqtt.md "Scheduling downlinks")."""

from __future__ import annotations

from aiohttp import web

from driver_core.downlinks import DownlinkQueue

from .operation import DRIVER, Inputs, Link, Operation, Response
from .schemas import COMMAND_ID_PATH, DOWNLINK_BODY, DOWNLINKS_QUERY, SERIAL_PATH


def _queue(request: web.Request) -> DownlinkQueue:
    queue = request.app[DRIVER].downlinks
    assert queue is not None, "the driver is not started"
    return queue


async def schedule_downlink(request: web.Request, inputs: Inputs) -> web.Response:
    body = inputs.body
    view, created = await _queue(request).schedule(
        inputs.path["serial"],
        body["command"],
        body.get("parameter"),
        command_id=body.get("command_id"),
        callback_url=body.get("callback_url"),
    )
    return web.json_response(view.as_json(), status=201 if created else 200)


async def downlink_history(request: web.Request, inputs: Inputs) -> web.Response:
    offset, limit = inputs.query["offset"], inputs.query["limit"]
    items, total = await _queue(request).history(inputs.path["serial"], offset, limit)
    return web.json_response(
        {"items": [view.as_json() for view in items], "total": total, "offset": offset, "limit": limit}
    )


async def get_downlink(request: web.Request, inputs: Inputs) -> web.Response:
    view = await _queue(request).get(inputs.path["command_id"])
    return web.json_response(view.as_json())


async def cancel_downlink(request: web.Request, inputs: Inputs) -> web.Response:
    view = await _queue(request).cancel(inputs.path["command_id"])
    return web.json_response(view.as_json())


# Where a downlink's command_id leads (documentation, and schemathesis follows them).
_FOLLOW = {
    "GetDownlink": Link("getDownlink", {"command_id": "$response.body#/command_id"}),
    "CancelDownlink": Link("cancelDownlink", {"command_id": "$response.body#/command_id"}),
}

OPERATIONS = [
    Operation(
        operation_id="scheduleDownlink",
        method="POST",
        path="/devices/{serial}/downlinks",
        handler=schedule_downlink,
        summary="Schedule a downlink",
        description=(
            "Queue a command or configuration for the device. It is delivered inside the answer "
            "to the device's next transmission, so it stays in state 0 (Pending) until then. "
            "The command must be one of the device family's commands or configurations "
            "(see GET /device-families) and the parameter is validated against its schema. "
            "Repeating the request with the same command_id and body is answered 200 with the "
            "existing downlink; the same command_id with a different body is a 409."
        ),
        tag="Downlinks",
        path_params=SERIAL_PATH,
        body=DOWNLINK_BODY,
        body_example={
            "command": "tx_interval",
            "parameter": 30,
            "command_id": "0219dfb3-00a8-40e6-90ea-1f83e807e885",
            "callback_url": "https://example.com/downlink-status",
        },
        responses={
            201: Response("The downlink is queued (state 0)", "Downlink", _FOLLOW),
            200: Response(
                "A repeat of an earlier request: the existing downlink", "Downlink", _FOLLOW
            ),
            404: Response("No device with this serial number", "Error"),
            409: Response(
                "The command_id is already used by a different downlink, or the device's "
                "queue is full",
                "Error",
            ),
        },
    ),
    Operation(
        operation_id="listDownlinks",
        method="GET",
        path="/devices/{serial}/downlinks",
        handler=downlink_history,
        summary="Downlink history of a device",
        description="The device's downlinks, newest first, one page at a time.",
        tag="Downlinks",
        path_params=SERIAL_PATH,
        query=DOWNLINKS_QUERY,
        responses={
            200: Response("One page of downlinks", "DownlinkPage"),
            404: Response("No device with this serial number", "Error"),
        },
    ),
    Operation(
        operation_id="getDownlink",
        method="GET",
        path="/downlinks/{command_id}",
        handler=get_downlink,
        summary="One downlink and its state",
        tag="Downlinks",
        path_params=COMMAND_ID_PATH,
        responses={
            200: Response("The downlink", "Downlink"),
            404: Response("No downlink with this command_id", "Error"),
        },
    ),
    Operation(
        operation_id="cancelDownlink",
        method="DELETE",
        path="/downlinks/{command_id}",
        handler=cancel_downlink,
        summary="Cancel a pending downlink",
        description=(
            "Only a downlink in state 0 (Pending) can be canceled; it moves to state 1 "
            "(Canceled by the user). Once sent it is too late: 409."
        ),
        tag="Downlinks",
        path_params=COMMAND_ID_PATH,
        responses={
            200: Response("The canceled downlink (state 1)", "Downlink"),
            404: Response("No downlink with this command_id", "Error"),
            409: Response("The downlink is not pending any more", "Error"),
        },
    ),
]
