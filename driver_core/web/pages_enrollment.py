"""Enrollment: add one device, import a CSV with a per-row report (delete is on the device page)."""

from __future__ import annotations

from aiohttp import web

from driver_core.enrollment import (
    CSV_COLUMNS,
    EnrollmentError,
    add_device,
    import_csv,
    parse_device,
)

from .context import driver, form, page, redirect

routes = web.RouteTableDef()
DEVICE_FIELDS = ("serial", "hw_type", "sender_id", "master_secret", "master_salt", "name")


def _hw_types(request: web.Request) -> list[tuple[int, str]]:
    return [
        (hw_type, f"{hw_type} — {family.hw_types[hw_type]} ({family.name})")
        for hw_type, family in sorted(driver(request).families.items())
    ]


def _page(request: web.Request, status: int = 200, **values) -> web.Response:
    values.setdefault("values", {})
    values.setdefault("errors", {})
    values.setdefault("report", None)
    values.setdefault("import_error", None)
    return page(
        request,
        "enrollment.html",
        status=status,
        title="Enrollment",
        hw_types=_hw_types(request),
        columns=CSV_COLUMNS,
        **values,
    )


@routes.get("/enrollment")
async def enrollment(request: web.Request) -> web.Response:
    return _page(request)


@routes.post("/enrollment/add")
async def add(request: web.Request) -> web.Response:
    data = form(request)
    values = {key: data.get(key, "") for key in DEVICE_FIELDS}
    the_driver = driver(request)
    try:
        device = parse_device(values, the_driver.families.keys())
        await add_device(the_driver.db, the_driver.box, device)
    except EnrollmentError as exc:
        return _page(request, 400, values=values, errors={exc.field or "_": exc.message})
    # The CoAP side may remember this kid as unknown for a few seconds: let it join now.
    the_driver.credentials.forget(device.sender_id)
    return redirect(f"/devices/{device.serial}", notice="added", serial=device.serial)


@routes.post("/enrollment/import")
async def import_file(request: web.Request) -> web.Response:
    data = form(request)
    problem = data.get("file__error")
    text = data.get("file", "")
    if problem is None and not text.strip():
        text = data.get("csv_text", "")
        if not text.strip():
            problem = "choose a CSV file or paste its lines"
    if problem is not None:
        return _page(request, 400, import_error=problem)
    the_driver = driver(request)
    report = await import_csv(the_driver.db, the_driver.box, text, the_driver.families.keys())
    if report.added:  # new devices may JOIN at once (clears the unknown-kid cache)
        await the_driver.credentials.reconcile()
    return _page(
        request,
        200 if not report.errors else 400,
        report=report,
        filename=data.get("file__filename", ""),
    )
