"""The device page's Charts tab: each numeric value over the last day or week."""

from __future__ import annotations

from aiohttp import web

from .charts import RANGE_LABELS, RANGES, device_charts, format_number
from .context import driver
from .pages_devices import _device_or_404, _device_page

routes = web.RouteTableDef()


@routes.get("/devices/{serial}/charts")
async def charts(request: web.Request) -> web.Response:
    device = await _device_or_404(request)
    range_key = request.query.get("range", "day")
    if range_key not in RANGES:
        range_key = "day"  # a hand-edited address still shows something sensible
    return await _device_page(
        request,
        device,
        "charts",
        charts=await device_charts(driver(request), device, range_key),
        range_key=range_key,
        range_labels=RANGE_LABELS,
        number=format_number,
    )
