"""The API's typed answers, as /openapi.json publishes them (FastAPI builds the schema from these classes).
The routes build plain dicts of this shape and answer them as JSON: these classes describe, they do not
validate each answer again."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, Field

from mnist_pipeline.contract import NUM_CLASSES
from mnist_pipeline.records import versions
from mnist_pipeline.serve.http import MAX_FILES

API_VERSION = "1"
# ?version=: ASCII digits (str.isdigit() takes '²' and Arabic-Indic digits), bounded before int() reads them
VERSION = r"^[0-9]{1,9}$"


class Error(BaseModel):
    error: str = Field(description="what is wrong, and how to fix it")


ERROR: Dict[str, Any] = {"model": Error, "description": "the request is refused: `error` says why"}


class Health(BaseModel):
    status: str


class Checkpoint(BaseModel):
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    epoch: int = Field(ge=0)
    version: Optional[int] = Field(None, ge=1, description="absent while no version is production yet")


class Prediction(BaseModel):
    digit: int = Field(ge=0, le=NUM_CLASSES - 1)
    confidence: float = Field(ge=0, le=1)
    probabilities: List[float] = Field(min_length=NUM_CLASSES, max_length=NUM_CLASSES)


class Predictions(BaseModel):
    checkpoint: Checkpoint
    predictions: List[Prediction] = Field(min_length=1, max_length=MAX_FILES, description="in upload order")


class Ready(BaseModel):
    checkpoint: Checkpoint
    accuracy: float = Field(ge=0, le=1)
    threshold: float
    runtime: str = Field(description="onnx or torch")
    model: Union[int, str] = Field(description="--model: the alias followed, or the version pinned")
    pending: Optional[str] = Field(None, description="why a newer model does not serve yet")
    feedback: bool = Field(False, description="whether POST /feedback keeps samples (serve --feedback on)")


class Version(BaseModel):
    version: int = Field(ge=1)
    aliases: List[str]
    epoch: Optional[int] = None
    accuracy: Optional[float] = None
    test_loss: Optional[float] = None
    created: Optional[str] = None
    sha256: Optional[str] = None
    corrupt: Optional[str] = Field(None, description="why the version does not read (then only `version` and "
                                                     "`aliases` are given)")
    feedback: Optional[versions.Feedback] = Field(None, description="how it read the accepted held-out feedback when "
                                                          "evaluated (null: there was none)")


class Models(BaseModel):
    model: Union[int, str]
    serving: Optional[int] = Field(None, description="the version answering now (null: none, or no version yet)")
    aliases: Dict[str, int]
    versions: List[Version]


FILE = {"type": "string", "format": "binary"}


def _body(**fields: Dict[str, Any]) -> Dict[str, Any]:
    """The body of a route that reads it itself, for the schema: a multipart form of `fields`, or a raw image."""
    image = {"schema": FILE}
    form = {"type": "object", "required": list(fields), "properties": fields}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form}, "image/png": image, "image/jpeg": image}}}


PREDICT_BODY = _body(file={"type": "array", "maxItems": MAX_FILES, "items": FILE})


class FeedbackAccepted(BaseModel):
    id: str = Field(pattern="^[0-9a-f]{64}$", description="the sample's name in feedback/ (`mnist feedback` lists it)")
    label: int = Field(ge=0, le=NUM_CLASSES - 1)
    predicted: int = Field(ge=0, le=NUM_CLASSES - 1, description="what the server's model read")
    version: Optional[int] = Field(None, ge=1, description="the version that read it (null: none kept yet)")
    split: str = Field(description="train or heldout: the share it falls in once accepted, by its id")

FEEDBACK_BODY = _body(file=FILE, label={"type": "string", "pattern": "^[0-9]$"})
