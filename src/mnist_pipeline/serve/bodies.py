"""A request's images: repeated multipart `file` fields (Starlette's form parsing, with its limits), or one raw
body with an image Content-Type. The body's size and pace are bounded before this, in http.Front."""

from __future__ import annotations

from typing import List

from fastapi import Request
from starlette.datastructures import UploadFile

from mnist_pipeline.serve.http import ClientError

MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_FILES = 64


async def images(request: Request) -> List[bytes]:
    """The request's images, each at most MAX_IMAGE_BYTES, at most MAX_FILES of them."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith("image/"):
        body = await _raw(request)
        if not body:
            raise ClientError(400, "the request body is empty: send an image")
        return [body]
    if kind != "multipart/form-data":
        raise ClientError(415, f"Content-Type {kind or '(none)'!r} is not accepted: send multipart/form-data "
                               f"with the image in the field `file`, or the image itself as image/png, image/jpeg, ...")
    # (a malformed body, or more than MAX_FILES files: Starlette's 400 saying which)
    async with request.form(max_files=MAX_FILES, max_fields=MAX_FILES, max_part_size=MAX_IMAGE_BYTES) as form:
        files = [value for key, value in form.multi_items() if key == "file"]
        if not files:
            raise ClientError(400, "no `file` field: send each image as a multipart field named `file`")
        if not all(isinstance(f, UploadFile) for f in files):
            raise ClientError(400, "the `file` field holds text, not a file: upload the image as a file")
        images = []
        for number, upload in enumerate(files, 1):
            data = await upload.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise ClientError(413, f"file {number} is over {MAX_IMAGE_BYTES // 2**20} MB: send a smaller image")
            if not data:
                raise ClientError(400, f"file {number} is empty: send an image")
            images.append(data)
        return images


async def _raw(request: Request) -> bytes:
    """The body, or 413 once it exceeds MAX_IMAGE_BYTES (the rest of it is not kept)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_IMAGE_BYTES:
            chunks.append(chunk)
    if size > MAX_IMAGE_BYTES:
        raise ClientError(413, f"the image is over {MAX_IMAGE_BYTES // 2**20} MB: send a smaller image")
    return b"".join(chunks)
