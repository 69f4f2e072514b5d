"""POST /feedback: a person's drawing and the digit it really is, kept in feedback/ for review (docs/feedback.md).

The image goes through /predict's steps (bodies, model_for, decode_and_predict): what is kept is the 28x28
image the model read, with the label, and the version and digit the server computed; nothing a client claims
about the prediction is trusted, and nothing about the client is kept. Each client address has a token bucket
(in each worker: --workers N lets a client send N times --feedback-rate); the pending samples are capped in
count and bytes (507 beyond). Off (the default), the route answers 404.
"""

from __future__ import annotations

import ipaddress
from typing import Dict, Optional, Tuple

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from mnist_pipeline.contract import describe
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.records import feedback as samples
from mnist_pipeline.serve import api, http
from mnist_pipeline.serve.http import ClientError
from mnist_pipeline.serve.service import Service, decode_and_predict, model_for, version_header

routes = APIRouter(tags=["feedback"], responses={400: api.ERROR, 503: api.ERROR})


def client_address(request: Request, trusted: Optional[Tuple[str, ...]]) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the last address in X-Forwarded-For
    that is not one (what a client writes there itself comes before the proxies' own entries and is passed over)."""
    peer = request.client.host if request.client else "-"
    trusted = trusted or ()
    if peer not in trusted:
        return peer
    chain = [part.strip() for header in request.headers.getlist("x-forwarded-for") for part in header.split(",")]
    for address in reversed(chain):
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            return peer  # a malformed entry from the proxy's side: the proxy is the client we know
        if address not in trusted:
            return address
    return peer


async def _image_and_label(request: Request, label: Optional[str]) -> Tuple[bytes, str]:
    """The upload (multipart `file` and `label`, or a raw image body with ?label=N) and its label's text."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        images = await http.images(request)  # (415 for a body that is no image)
        return images[0], label or ""
    async with request.form(max_files=1, max_fields=2, max_part_size=http.MAX_IMAGE_BYTES) as form:
        upload, text = form.get("file"), form.get("label", label)
        if not isinstance(upload, UploadFile):
            raise ClientError(400, "no `file` field holding a file: send the image as a multipart file named `file`")
        data = await upload.read(http.MAX_IMAGE_BYTES + 1)
        if len(data) > http.MAX_IMAGE_BYTES:
            raise ClientError(413, f"the image is over {http.MAX_IMAGE_BYTES // 2**20} MB: send a smaller image")
        if not data:
            raise ClientError(400, "the image is empty: send an image")
        return data, text if isinstance(text, str) else ""


def _digit(text: str) -> int:
    if len(text) != 1 or text not in "0123456789":
        raise ClientError(400, f"label {text[:20]!r} is not a digit: send label=0 ... label=9 (the form field "
                               f"`label`, or ?label=N with a raw image)")
    return int(text)


@routes.post("/feedback", status_code=202, response_model=api.FeedbackAccepted, openapi_extra=api.FEEDBACK_BODY,
             responses={404: api.ERROR, 409: api.ERROR, 413: api.ERROR, 415: api.ERROR, 429: api.ERROR,
                        507: api.ERROR})
async def feedback(request: Request, label: Optional[str] = Query(
        None, max_length=1, description="the digit drawn (0-9), with a raw image body; multipart sends the form "
                                        "field `label`"), version: Optional[str] = Query(
        None, pattern=api.VERSION, description="the version that answered (GET /models); default: the one serving. "
                                           "The server predicts with it again and keeps its own answer")
        ) -> JSONResponse:
    """Keep a drawing with the digit it really is, for review (`mnist feedback`): 202 with the sample's id. Off
    unless serve runs with --feedback on (then 404)."""
    service: Service = request.app.state.service
    config = service.config
    if not config.feedback:
        raise ClientError(404, "feedback is off: start serve with --feedback on (MNIST_FEEDBACK=on) to accept it")
    wait = service.feedback_limiter.take(client_address(request, config.trusted_proxy))
    if wait is not None:
        raise ClientError(429, f"too many feedback samples from this address (at most {config.feedback_rate} a "
                               f"minute): retry in {wait} s", {"Retry-After": str(wait)})
    data, text = await _image_and_label(request, label)
    digit = _digit(text)
    live = await model_for(service, None if version is None else int(version))
    pixels: Dict[int, bytes] = {}
    probabilities = await decode_and_predict(service, live, [data], keep=pixels)
    predicted = describe(probabilities[0])["digit"]  # as /predict answers it
    sample = await run_in_threadpool(_store, service, pixels[0], digit, predicted, live.version)
    return JSONResponse({"id": sample.id, "label": digit, "predicted": predicted, "version": live.version,
                         "split": sample.split}, status_code=202, headers=version_header(live))


def _store(service: Service, image: bytes, label: int, predicted: int, version: Optional[int]) -> samples.Sample:
    config = service.config
    if service.volume.feedback_record(samples.sample_id(image, label)).exists():
        raise ClientError(409, "this drawing with this label is kept already")
    count, size = service.feedback_pending.totals()
    if count >= config.feedback_max_pending or size >= config.feedback_max_bytes:
        raise ClientError(507, f"feedback is full: {count} samples ({size:,} bytes) wait for review; "
                               f"review them (`mnist feedback`) and retry")
    try:
        return samples.add(service.volume, image, label, predicted, version)
    except samples.Duplicate:
        raise ClientError(409, "this drawing with this label is kept already") from None
    except PipelineError as exc:
        raise ClientError(507, f"feedback cannot be kept: {service.public(str(exc))}") from None
