"""A digit classifier over HTTP written plainly, as a user would: FastAPI, Pillow, onnxruntime's defaults.

    export PEER_MODEL=VOLUME/model/versions/N/mnist_cnn.onnx
    uvicorn --app-dir bench/peers plain:app --workers 2

POST /predict with one or more multipart fields `file` (images) -> the digit and probabilities of each.
A peer for bench/serve_bench.py, not part of the package.
"""

import io
import os
from typing import Annotated

import numpy as np
import onnxruntime
from fastapi import FastAPI, File, UploadFile
from PIL import Image, ImageOps

session = onnxruntime.InferenceSession(os.environ["PEER_MODEL"], providers=["CPUExecutionProvider"])
app = FastAPI()


def pixels(data: bytes) -> np.ndarray:
    image = ImageOps.invert(Image.open(io.BytesIO(data)).convert("L")).resize((28, 28))
    return np.asarray(image, dtype=np.uint8)


@app.post("/predict")
async def predict(file: Annotated[list[UploadFile], File()]):
    images = np.stack([pixels(await upload.read()) for upload in file])
    probabilities = session.run(["probabilities"], {"images": images})[0]
    return {"predictions": [{"digit": int(p.argmax()), "probabilities": p.tolist()} for p in probabilities]}
