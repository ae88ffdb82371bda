"""``finegrain serve``: a search page and a JSON API over an index folder (FastAPI + uvicorn).

Routes (the schema is at ``/docs`` and ``/openapi.json``):

- ``GET /``: the page (``finegrain/static/``, plain HTML + JS, no build step);
- ``GET /health``: ``{"status": "ok", "images", "model_name", "task", "dim", "explain",
  "explain_pair", "k_max"}``;
- ``POST /search`` (a form, multipart for a file): ``image`` (a file) or ``gallery_id``, ``k`` (1..k_max),
  ``explain`` (true: the query's attention picture as a PNG data URL) -> ``{"query", "k",
  "results": [{"rank", "id", "name", "score", "label", "url"}], "attention", "took_ms"}``;
- ``POST /explain/pair`` (multipart form): ``image`` or ``gallery_id``, and ``result_id`` ->
  a PNG of where the query attends in that result (Re-ID / pair-wise models);
- ``GET /gallery`` (``offset``, ``limit``): the gallery's ids and names;
  ``GET /gallery/{id}``: the gallery image file.

Bad requests get a 4xx with ``{"detail": "<what is wrong and the fix>"}`` and the server keeps
serving: 400 not an image / truncated, 404 unknown id, 413 over ``max_upload_mb`` or
``max_pixels``, 415 not a form or not an image content type, 422 ``k`` out of range. The
index folder is only read; uploads are held in memory (Starlette spools large parts to the
system's temporary folder) and pictures are drawn in a temporary folder, deleted after.
"""

import base64
import mimetypes
import os
import time
from typing import Optional

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from .api import DEFAULT_MAX_PIXELS, ImageTooLarge, Searcher, decode_image_bytes
from .errors import FinegrainError, InputError, MissingFileError, UnknownNameError

__all__ = ["create_app", "serve"]

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")


# ---- the JSON schemas (/openapi.json) ---------------------------------------------------
class Result(BaseModel):
    """A hit (:class:`finegrain.api.Hit`) with the URL of its image."""
    rank: int
    id: int
    name: str
    score: float
    label: int
    url: str


class SearchResponse(BaseModel):
    query: str
    k: int
    results: list[Result]
    attention: Optional[str] = None
    took_ms: float


class Health(BaseModel):
    status: str
    images: int
    model_name: str
    task: str
    dim: int
    explain: bool
    explain_pair: bool
    k_max: int


class GalleryItem(BaseModel):
    id: int
    name: str
    label: int
    url: str


class GalleryPage(BaseModel):
    count: int
    offset: int
    items: list[GalleryItem]


def create_app(index_dir: str, model: str | None = None, k_max: int = 100,
               max_upload_mb: float = 20.0, max_pixels: int = DEFAULT_MAX_PIXELS,
               device: str = "cpu", gallery_root: str | None = None,
               searcher: Searcher | None = None):
    """The FastAPI app of ``finegrain serve`` (module docstring).

    Args:
        index_dir: the index folder (only read).
        model: checkpoint or export folder (default: the one the index records).
        k_max: largest ``k`` a request may ask for.
        max_upload_mb: largest upload, in MB (413 above).
        max_pixels: largest image, width x height (413 above; checked before decoding).
        device: where the model runs.
        gallery_root: where the gallery images are, when they moved since ``embed``.
        searcher: an already opened :class:`~finegrain.api.Searcher` (tests, benchmarks).
    """
    s = searcher or Searcher(index_dir, model=model, device=device, gallery_root=gallery_root)
    s.check_gallery()  # an index naming files outside its gallery root is refused now
    max_bytes = int(max_upload_mb * 1e6)
    app = FastAPI(title="finegrain search", version="1",
                  description=f"Search {index_dir} ({len(s)} images) by image.")
    app.state.searcher = s

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{where}: {e.get('msg')}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    def _error(e: Exception) -> HTTPException:
        if isinstance(e, ImageTooLarge):
            return HTTPException(413, str(e))
        if isinstance(e, UnknownNameError):
            return HTTPException(404, str(e))
        if isinstance(e, MissingFileError):
            return HTTPException(404, str(e))
        return HTTPException(400, str(e))

    def _check_multipart(request: Request) -> None:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise HTTPException(415, f"send a form, multipart/form-data (an 'image' file field "
                                     f"or a 'gallery_id' field), not {ctype or 'no body'}")

    def _query(images: Optional[list[UploadFile]], gallery_id: Optional[int]):
        """(query name, decoded image or None, gallery id or None)."""
        if images and len(images) > 1:
            raise HTTPException(400, f"the form holds {len(images)} 'image' files; send one "
                                     f"image per request (one search per image)")
        image = images[0] if images else None
        if (image is None) == (gallery_id is None):
            raise HTTPException(400, "send one of: an 'image' file field, or a 'gallery_id' "
                                     "field (a gallery image as the query)")
        if image is None:
            return s.name_of(gallery_id), None, gallery_id
        if (image.content_type or "") not in IMAGE_TYPES:
            raise HTTPException(415, f"{image.filename!r} has content type "
                                     f"{image.content_type!r}; send an image "
                                     f"({', '.join(IMAGE_TYPES)})")
        data = image.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{image.filename!r} is over the limit of "
                                     f"{max_upload_mb:g} MB; send a smaller image")
        if not data:
            raise HTTPException(400, f"{image.filename!r} is empty")
        name = os.path.basename(image.filename or "upload")
        return name, decode_image_bytes(data, max_pixels, repr(name)), None

    @app.middleware("http")
    async def _limit_size(request: Request, call_next):
        """Refuse an over-long body before it is read (and spooled)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes + 65536:
            return JSONResponse({"detail": f"the request is {int(length) / 1e6:.1f} MB, over "
                                           f"the limit of {max_upload_mb:g} MB; send a smaller "
                                           f"image"}, status_code=413)
        return await call_next(request)

    def _url(i: int) -> str:
        return f"/gallery/{i}"

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/health", response_model=Health)
    def health():
        """Whether the server is up, and what it searches."""
        return Health(status="ok", images=len(s), model_name=s.meta.model_name,
                      task=s.meta.task, dim=int(s.index.manifest["dim"]),
                      explain=s.can_explain, explain_pair=s.can_explain_pair, k_max=k_max)

    @app.post("/search", response_model=SearchResponse,
              responses={400: {"description": "not an image, truncated, no query"},
                         404: {"description": "unknown gallery_id"},
                         413: {"description": "over the upload or pixel limit"},
                         415: {"description": "not multipart, or not an image type"},
                         422: {"description": "k out of range"}})
    def search(request: Request,
               image: Optional[list[UploadFile]] = File(None, description="the query image "
                                                                     "(one)"),
               gallery_id: Optional[int] = Form(None, description="or: a gallery id as query"),
               k: int = Form(10, ge=1, le=k_max, description="results"),
               explain: bool = Form(False, description="add the query's attention picture")):
        """Top-k gallery images of an uploaded image (or of a gallery image)."""
        _check_multipart(request)
        t0 = time.perf_counter()
        try:
            name, img, gid = _query(image, gallery_id)
            res = s.search_gallery(gid, k) if img is None else s.search([img], k)[0]
            attention = None
            source = img if img is not None else s.gallery_path(gid)
            if explain and s.can_explain and source is not None:
                picture = s.explain(source, name)
                attention = "data:image/png;base64," + base64.b64encode(picture).decode()
        except FinegrainError as e:
            raise _error(e) from None
        results = [Result(url=_url(h.id), **vars(h)) for h in res.hits]
        return SearchResponse(query=name, k=k, results=results, attention=attention,
                              took_ms=1000 * (time.perf_counter() - t0))

    @app.post("/explain/pair", response_class=Response,
              responses={200: {"content": {"image/png": {}},
                               "description": "where the query attends in the result"}})
    def explain_pair(request: Request, result_id: int = Form(...),
                     image: Optional[list[UploadFile]] = File(None),
                     gallery_id: Optional[int] = Form(None)):
        """Why a result matches: the query's pair-wise attention over it (Re-ID models)."""
        _check_multipart(request)
        if not s.can_explain_pair:
            raise HTTPException(400, f"{s.meta.model_name} draws no pair-wise "
                                     f"attention (DCAL Re-ID and cross-image models do)")
        try:
            name, img, gid = _query(image, gallery_id)
            query = img if img is not None else s.require_path(gid)
            png = s.explain_pair(query, result_id, name)
        except FinegrainError as e:
            raise _error(e) from None
        return Response(png, media_type="image/png")

    @app.get("/gallery", response_model=GalleryPage)
    def gallery(offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=1000)):
        """A page of the gallery: ids, names, labels, image urls."""
        idx = s.index
        items = [GalleryItem(id=i, name=n, label=lab, url=_url(i)) for i, n, lab in
                 zip(idx.ids[offset:offset + limit], idx.names[offset:offset + limit],
                     idx.labels[offset:offset + limit])]
        return GalleryPage(count=len(idx), offset=offset, items=items)

    @app.get("/gallery/{gallery_id}", response_class=FileResponse,
             responses={200: {"content": {"image/*": {}}}, 404: {}})
    def gallery_image(gallery_id: int):
        """The image file of a gallery id."""
        try:
            path = s.require_path(gallery_id)
        except FinegrainError as e:
            raise _error(e) from None
        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(index_dir: str, model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          **kwargs) -> None:
    """Run :func:`create_app` with uvicorn until interrupted."""
    import uvicorn
    if not 0 <= port < 65536:
        raise InputError(f"--port {port}: give a port between 1 and 65535 (0: any free one)")
    app = create_app(index_dir, model=model, **kwargs)
    if port == 0:  # any free port: pick it now, so the address can be printed
        import socket
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    print(f"finegrain serve: {index_dir} ({len(app.state.searcher)} images) at "
          f"http://{shown}:{port}/  (API: /docs; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
