"""The "API Docs" page: Swagger UI from the installed swagger-ui-bundle package, no CDN.

The page and its files use relative URLs, so they keep working behind a reverse
proxy that mounts the driver under a prefix. Public like the OpenAPI document:
neither reveals anything, and every call made from the page needs a token.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from .errors import not_found
from .operation import API_PREFIX

DOCS_PATH = f"{API_PREFIX}/docs"
STATIC_PATH = f"{DOCS_PATH}/static"
OPENAPI_PATH = f"{API_PREFIX}/openapi.json"

# Relative to /api/v1/docs, i.e. resolved against /api/v1/.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>coap-driver API Docs</title>
  <link rel="stylesheet" type="text/css" href="docs/static/swagger-ui.css">
  <link rel="stylesheet" type="text/css" href="docs/static/index.css">
  <link rel="icon" type="image/png" href="docs/static/favicon-32x32.png" sizes="32x32">
  <link rel="icon" type="image/png" href="docs/static/favicon-16x16.png" sizes="16x16">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/static/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="docs/swagger-initializer.js" charset="UTF-8"></script>
</body>
</html>
"""

# validatorUrl null: Swagger UI would otherwise send the document to validator.swagger.io.
_INITIALIZER = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
};
"""


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=_PAGE, content_type="text/html")


async def docs_initializer(request: web.Request) -> web.Response:
    return web.Response(text=_INITIALIZER, content_type="application/javascript")


async def docs_slash(request: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently("../docs")


def _static_handler() -> web.RequestHandler:
    """Serve the files of the package folder by name (a fixed list: no path ever reaches disk)."""
    folder = Path(str(swagger_ui_path))
    files = {path.name: path for path in folder.iterdir() if path.is_file()}

    async def static_file(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            raise not_found(f"no such resource: {request.path}")
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})

    return static_file


def add_docs_routes(app: web.Application) -> None:
    app.router.add_get(DOCS_PATH, docs_page)
    app.router.add_get(f"{DOCS_PATH}/", docs_slash)
    app.router.add_get(f"{DOCS_PATH}/swagger-initializer.js", docs_initializer)
    app.router.add_get(f"{STATIC_PATH}/{{name}}", _static_handler())


def is_public(path: str) -> bool:
    """Paths under /api/v1 reachable without a token."""
    return path in (OPENAPI_PATH, DOCS_PATH) or path.startswith(f"{DOCS_PATH}/")
