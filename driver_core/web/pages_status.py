"""Status: CoAP listener, integrations (broker connection, outbox), traffic, refusals."""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web
from sqlalchemy import func, select

from driver_core.storage.models import Device, UplinkRecord
from driver_core.timefmt import utcnow

from .context import ctx, driver, page

routes = web.RouteTableDef()


@routes.get("/status")
async def status(request: web.Request) -> web.Response:
    the_driver = driver(request)
    now = utcnow()
    async with the_driver.db.session() as session:
        per_minute = await session.scalar(
            select(func.count()).where(UplinkRecord.received_at >= now - timedelta(minutes=1))
        )
        last_hour = await session.scalar(
            select(func.count()).where(UplinkRecord.received_at >= now - timedelta(hours=1))
        )
        devices = await session.scalar(select(func.count(Device.id)))
    try:
        port = the_driver.coap_port
        listening = True
    except (AssertionError, RuntimeError):
        port, listening = the_driver.config.coap["port"], False
    integrations = []
    for domain, name in ctx(request).integration_names.items():
        handle = the_driver.integrations.running.get(domain)
        info = getattr(handle, "status", None) if handle is not None else None
        integrations.append(
            {"domain": domain, "name": name, "running": handle is not None, "status": info}
        )
    return page(
        request,
        "status.html",
        title="Status",
        coap={"host": the_driver.config.coap["host"], "port": port, "listening": listening},
        storage=the_driver.db.health,
        integrations=integrations,
        per_minute=per_minute or 0,
        per_hour_avg=round((last_hour or 0) / 60, 1),
        devices=devices or 0,
        refusals=sorted(the_driver.refusals.counts.items()),
        now=now,
    )
