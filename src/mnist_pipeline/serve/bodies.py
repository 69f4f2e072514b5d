"""A request's images: its body read within bounds, then parsed (multipart) into each image's bytes.
Every byte held is counted against the process's upload budget (budget.Uploads) through `take`."""

from __future__ import annotations

from typing import AsyncIterator, List

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from mnist_pipeline.serve.http import ClientError

MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_FILES = 64
MAX_BODY_BYTES = 16 * 1024 * 1024  # several images in one multipart request
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body up to this is read to its end before the 413
UPLOADS_BYTES = 128 * 1024 * 1024  # all request bodies (and their parsed files) held at once


async def images(request: Request, take) -> List[bytes]:
    """The request's images: repeated multipart `file` fields, or one raw body with an image Content-Type."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data" and not kind.startswith("image/"):
        raise ClientError(415, f"Content-Type {kind or '(none)'!r} is not accepted: send multipart/form-data "
                               f"with the image in the field `file`, or the image itself as image/png, image/jpeg, ...")
    body = await _body(request, MAX_BODY_BYTES if kind == "multipart/form-data" else MAX_IMAGE_BYTES, take)
    if not body:
        raise ClientError(400, "the request body is empty: send an image")
    if kind.startswith("image/"):
        return [body]
    take(len(body))  # the parsed files, beside the body until it is parsed
    pending = [body]
    del body  # held by `pending` alone, which the parser empties

    async def stream() -> AsyncIterator[bytes]:
        yield pending.pop()

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=MAX_FILES,
                                     max_part_size=MAX_IMAGE_BYTES).parse()
    except MultiPartException as exc:
        too_many = "Too many files" in exc.message
        raise ClientError(413 if too_many else 400, f"more than {MAX_FILES} files in one request: send fewer"
                          if too_many else f"malformed multipart body: {exc.message}") from None
    try:
        files = [value for key, value in form.multi_items() if key == "file"]
        if not files:
            raise ClientError(400, "no `file` field: send each image as a multipart field named `file`")
        if not all(isinstance(f, UploadFile) for f in files):
            raise ClientError(400, "the `file` field holds text, not a file: upload the image as a file")
        images = []
        for number, upload in enumerate(files, 1):
            data = await upload.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise ClientError(413, f"file {number} ({upload.filename}) is over {MAX_IMAGE_BYTES // 2**20} MB: "
                                       f"send a smaller image")
            images.append(data)
        return images
    finally:
        await form.close()


async def _body(request: Request, limit: int, take) -> bytes:
    """The body, or 413 once it exceeds `limit`: never kept beyond it.

    The rest of an oversized body is read and dropped (up to DRAIN_BYTES), so that the client,
    still sending, gets to read the 413 instead of a broken connection.
    """
    declared = request.headers.get("content-length", "")
    too_large = ClientError(413, f"the request is over {limit // 2**20} MB: send a smaller image "
                                 f"(at most {MAX_IMAGE_BYTES // 2**20} MB each)")
    if declared.isdigit() and int(declared) > DRAIN_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_BYTES:
            break
        if size <= limit:
            take(len(chunk))
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)
