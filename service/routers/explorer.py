"""The preference explorer page (docs/explorer.md): static files shipped in the package."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent.parent / "static"
SAMPLE_IMAGE = Path(__file__).parent.parent / "example.png"
# Everything the page loads comes from this server: the policy makes that a browser-enforced fact.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self';"
        " connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/explorer")
async def explorer() -> FileResponse:
    """The preference explorer; it talks to this API only."""
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


@router.get("/explorer/example.png")
async def explorer_sample() -> FileResponse:
    """The bundled sample image (the one the README's curl calls post)."""
    return FileResponse(SAMPLE_IMAGE, media_type="image/png")


def static_files() -> StaticFiles:
    """Mounted at /explorer/static by the app (a mount is not a route of a router)."""
    return StaticFiles(directory=STATIC_DIR)
