"""A stored PDF answered to a download: streamed from a volume, or a 307 to a presigned URL of the
bucket (``adapters/storage.py``), so the API never relays large files it does not need to."""

from __future__ import annotations

from fastapi import Response
from fastapi.responses import RedirectResponse

from adapters.storage import DocumentStore
from api.errors import not_found

PDF = "application/pdf"


async def pdf_response(documents: DocumentStore, location: str, filename: str, missing_field: str) -> Response:
    """The document at ``location`` (404 naming ``missing_field`` when it is not stored)."""
    if not await documents.exists(location):
        raise not_found("document", location, field=missing_field)
    if (url := await documents.download_url(location, filename, PDF)) is not None:
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    return Response(
        await documents.get(location), media_type=PDF, headers={"Content-Disposition": f'inline; filename="{filename}"'}
    )
