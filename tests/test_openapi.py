"""The OpenAPI document: valid, complete, generated from the validation schemas, and true.

"True" is checked by schemathesis against the running driver: generated valid
and invalid requests must never get a 5xx, and every answer must match the
documented status codes, content types and response schemas.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from openapi_spec_validator import validate

from driver_core.api.openapi import convert
from driver_core.api.schemas import DEVICES_QUERY, DOWNLINK_BODY, device_body
from driver_core.enrollment import add_device
from tests.conftest import make_device

if TYPE_CHECKING:
    from tests.api_fixtures import ApiClient


SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


async def fetch_document(api: ApiClient) -> dict:
    reply = await api.call("GET", "/openapi.json", token=None)
    assert reply.status == 200
    return reply.body


async def test_document_is_valid_openapi_3(api: ApiClient):
    document = await fetch_document(api)
    validate(document)  # raises with the first problem
    assert document["openapi"] == "3.0.3"
    assert document["servers"] == [{"url": "/api/v1"}]


async def test_every_route_is_documented_and_every_documented_path_is_routed(api: ApiClient):
    document = await fetch_document(api)
    documented = {
        (method.upper(), "/api/v1" + path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    routed = {  # the same app also serves the web panel: only /api/v1 is the REST API
        (route.method, route.resource.canonical)
        for route in api.server.app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and route.resource.canonical.startswith("/api/v1")
    }
    public = {
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/docs"),
        ("GET", "/api/v1/docs/"),
        ("GET", "/api/v1/docs/swagger-initializer.js"),
        ("GET", "/api/v1/docs/static/{name}"),
    }
    assert routed - public == documented
    assert documented == {
        ("POST", "/api/v1/devices/{serial}/downlinks"),
        ("GET", "/api/v1/devices/{serial}/downlinks"),
        ("GET", "/api/v1/downlinks/{command_id}"),
        ("DELETE", "/api/v1/downlinks/{command_id}"),
        ("GET", "/api/v1/devices"),
        ("POST", "/api/v1/devices"),
        ("GET", "/api/v1/devices/{serial}"),
        ("DELETE", "/api/v1/devices/{serial}"),
        ("GET", "/api/v1/device-families"),
        ("POST", "/api/v1/firmware"),
        ("GET", "/api/v1/firmware"),
        ("GET", "/api/v1/firmware/{hw_type}/{version}"),
        ("DELETE", "/api/v1/firmware/{hw_type}/{version}"),
        ("GET", "/api/v1/firmware-targets"),
        ("PUT", "/api/v1/firmware-targets/hw-types/{hw_type}"),
        ("DELETE", "/api/v1/firmware-targets/hw-types/{hw_type}"),
        ("PUT", "/api/v1/devices/{serial}/firmware-target"),
        ("DELETE", "/api/v1/devices/{serial}/firmware-target"),
        ("GET", "/api/v1/devices/{serial}/firmware"),
    }


async def test_inputs_are_generated_from_the_validation_schemas(api: ApiClient):
    paths = (await fetch_document(api))["paths"]
    downlink = paths["/devices/{serial}/downlinks"]["post"]["requestBody"]["content"]
    assert downlink["application/json"]["schema"] == convert(DOWNLINK_BODY)
    enroll = paths["/devices"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert enroll == convert(device_body(api.driver.families))
    assert enroll["properties"]["hw_type"]["enum"] == [14, 16, 17, 18, 23, 24, 28, 29, 31]
    assert enroll["additionalProperties"] is False
    assert downlink["application/json"]["schema"]["properties"]["command_id"] == {
        "type": "string",
        "pattern": "^[^\\u0000-\\u001f\\u007f]{1,128}$",
        "description": downlink["application/json"]["schema"]["properties"]["command_id"][
            "description"
        ],
    }
    query = {p["name"]: p for p in paths["/devices"]["get"]["parameters"]}
    expected = convert(DEVICES_QUERY)["properties"]
    for name, parameter in query.items():
        assert parameter["in"] == "query" and parameter["required"] is False
        assert parameter["schema"] == {k: v for k, v in expected[name].items() if k != "description"}
    assert query["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}


async def test_every_operation_documents_its_errors(api: ApiClient):
    document = await fetch_document(api)
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            where = f"{method.upper()} {path}"
            for status in ("401", "500"):
                assert responses[status]["content"] == error_ref, where
            if operation.get("parameters") or "requestBody" in operation:
                assert responses["400"]["content"] == error_ref, where
            if "{" in path:
                assert responses["404"]["content"] == error_ref, where
            if "requestBody" in operation:
                assert {"413", "415"} <= set(responses), where
            assert [s for s in responses if s.startswith("2")], where
    assert document["paths"]["/devices/{serial}"]["delete"]["responses"]["204"] == {
        "description": "The device is deleted"
    }


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    api_on_each_database: ApiClient, tmp_path: Path
):
    api = api_on_each_database
    # A device under the serial the document's examples use, so they reach real data.
    await add_device(api.driver.db, api.driver.box, make_device("A0000001", 17, 1))
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "run",
        f"{api.base}/openapi.json",
        "--url", api.base,
        "--header", f"Authorization: Bearer {api.token}",
        "--checks", "all",
        # Which command and parameter a device takes depends on its family (data, not schema):
        # a schema-valid body may rightly be refused with 400.
        "--exclude-checks", "positive_data_acceptance",
        "--max-examples", "25",
        "--seed", "20250904",
        "--no-shrink",
        "--workers", "1",
        "--request-timeout", "10",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(110):
        output, _ = await process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "Operations:       19 selected / 19 total" in text, text
