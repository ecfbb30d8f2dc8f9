"""API tokens: create (shown once), list, revoke."""

from __future__ import annotations

from aiohttp import web

from driver_core.tokens import TokenError, create_token, list_tokens, revoke_token

from .context import driver, form, page, redirect

routes = web.RouteTableDef()


async def _page(request: web.Request, status: int = 200, **values) -> web.Response:
    values.setdefault("errors", {})
    values.setdefault("created", None)
    values.setdefault("name", "")
    return page(
        request,
        "tokens.html",
        status=status,
        title="API tokens",
        tokens=await list_tokens(driver(request).db),
        **values,
    )


@routes.get("/tokens")
async def tokens(request: web.Request) -> web.Response:
    return await _page(request)


@routes.post("/tokens")
async def create(request: web.Request) -> web.Response:
    name = form(request).get("name", "").strip()
    try:
        token = await create_token(driver(request).db, name)
    except TokenError as exc:
        return await _page(request, 400, errors={"name": str(exc)}, name=name)
    # Rendered, not redirected: the token must not travel in a URL or be shown again.
    return await _page(request, 201, created={"name": name, "token": token})


@routes.post("/tokens/revoke")
async def revoke(request: web.Request) -> web.Response:
    name = form(request).get("name", "")
    if not await revoke_token(driver(request).db, name):
        return await _page(request, 404, errors={"_": f"no token named {name!r}"})
    return redirect("/tokens", notice="revoked", name=name)
