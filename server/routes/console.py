"""``GET /`` (the web console) and ``GET /docs``, from files shipped in the package
(``server/console/``), so they work on a device with no internet.

``/redoc`` now leads to ``/docs``: ReDoc's bundle always loads its logo from
cdn.redoc.ly, which an offline page must not do, and Swagger UI shows the same schema.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
STATIC_PREFIX = "/console"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def console() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html")


@router.get("/docs")
async def swagger_ui() -> FileResponse:
    """Swagger UI on /openapi.json, from the vendored swagger-ui-dist files."""
    return FileResponse(CONSOLE_DIR / "docs.html")


@router.get("/redoc")
async def redoc() -> RedirectResponse:
    return RedirectResponse("/docs")


def mount_static(app: FastAPI) -> None:
    """The console's CSS, JS modules and vendored libraries under ``/console/``."""
    app.mount(STATIC_PREFIX, StaticFiles(directory=CONSOLE_DIR), name="console")
