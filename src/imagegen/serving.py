"""A trained model folder as an MLflow pyfunc model: requests {n, seed, label} in, PNG images out.

Request: one row per request (pandas DataFrame, a dict or a list of dicts), columns
  n      int, required, 1..MAX_IMAGES           number of images
  seed   int, optional, 0..2**63-1 (default 0)  latent seed; the same seed gives the same images
  label  int, optional                           class index for a conditional model; omit it
                                                 for an unconditional one (a conditional one then
                                                 cycles through the classes)
Over HTTP (`mlflow models serve`): {"dataframe_records": [{"n": 4, "seed": 1}]}, or the same
rows under "inputs" or "dataframe_split". At most MAX_IMAGES images per call, all rows together.
Values must be JSON integers (4.0 passes; "4", 2.5, true do not); a row may omit seed or label.

Response: a DataFrame with one row per image: request (input row index), index (image index
within that request), label (class index, -1 for an unconditional model) and png (a
base64-encoded 8-bit PNG of the model's image size and mode, as its model.json describes it:
e.g. 28 x 28 grayscale for Fashion-MNIST, 32 x 32 RGB for a colour folder). Over HTTP: {"predictions": [{"request": 0,
"index": 0, "label": -1, "png": "iVBORw0..."}, ...]}.

A bad request raises MlflowException(INVALID_PARAMETER_VALUE), which the scoring server
answers with HTTP 400 and the message (no traceback). No error message repeats more than a few
hundred characters of the request (MAX_ERROR_CHARS): MLflow's own "not valid JSON" message would
echo the whole body, so loading the model caps the scoring server's error messages too.
A body over MAX_BODY_BYTES is answered with HTTP 413 and one line, before it is read whole or parsed.
"""

from __future__ import annotations

import base64
import math
import struct
import warnings
import zlib
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

MAX_IMAGES = 1024
MAX_SEED = 2**63 - 1
MODEL_ARTIFACT = "model"  # the key of the models/<kind> folder among the pyfunc artifacts
OUTPUT_COLUMNS = ["request", "index", "label", "png"]
MAX_ERROR_CHARS = 500  # an error answer's message, at most
MAX_VALUE_CHARS = 40  # a request value quoted in an error message, at most
MAX_BODY_BYTES = 1 << 20  # a request body, at most (MAX_IMAGES images take a few KB of JSON)
DRAIN_BYTES = 64 << 20  # of a body over the limit, read (and dropped) at most this much before answering


# MLflow warns at class creation that predict has no type hints: the signature is given explicitly instead.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)

    class ImageSampler(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            import torch

            from imagegen.models.io import load_model

            cap_scoring_server_errors()
            limit_scoring_server_body()
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.module, self.description = load_model(Path(context.artifacts[MODEL_ARTIFACT]), self.device)

        def predict(self, context, model_input, params=None):
            from imagegen.evaluation.sampling import generate

            requests = parse_requests(model_input, self.description)
            rows = []
            for i, (n, seed, label) in enumerate(requests):
                images = generate(self.module, self.description, n, seed, label, self.device)
                labels = image_labels(self.description, n, label)
                rows += [(i, j, labels[j], png_base64(image)) for j, image in enumerate(images)]
            return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(cap(message, MAX_ERROR_CHARS))


def cap(text: str, limit: int) -> str:
    """text, or its first `limit` characters and how many were cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def quote(value) -> str:
    """A request value as an error message shows it: repr, capped."""
    return cap(repr(value), MAX_VALUE_CHARS)


def cap_scoring_server_errors() -> None:
    """Make the MLflow scoring server cap the message of every error answer at MAX_ERROR_CHARS.

    `mlflow models serve` loads the model (this runs from load_context) before it builds its app,
    and the app wraps its /invocations handler with scoring_server._async_catch_mlflow_exception:
    replacing that function caps MLflow's own messages too (a body that is not JSON is otherwise
    echoed whole). Elsewhere (imagegen sample, tests) it changes nothing.
    """
    from functools import wraps

    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    original = scoring_server._async_catch_mlflow_exception
    if getattr(original, "imagegen_capped", False):
        return

    def capped_catch(func):
        @wraps(func)
        async def handler(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            except MlflowException as exc:
                exc.message = cap(str(exc.message), MAX_ERROR_CHARS)
                raise

        return original(handler)

    capped_catch.imagegen_capped = True
    scoring_server._async_catch_mlflow_exception = capped_catch


def limit_scoring_server_body() -> None:
    """Make the MLflow scoring server answer 413 to a body over MAX_BODY_BYTES: by its Content-Length before
    reading it, else (chunked) as soon as the bytes streamed pass the limit; MLflow's handler, which reads the
    whole body and parses it, then gets the body read here. Hooked in as cap_scoring_server_errors is."""
    from functools import wraps

    from mlflow.pyfunc import scoring_server

    original = scoring_server._async_catch_mlflow_exception
    if getattr(original, "imagegen_body_limit", False):
        return

    def limited_catch(func):
        @wraps(func)
        async def handler(request):
            body = await bounded_body(request)
            if body is None:
                return body_too_large()
            return await func(replayed(request, body))

        return original(handler)

    limited_catch.imagegen_body_limit = True
    scoring_server._async_catch_mlflow_exception = limited_catch


async def bounded_body(request) -> bytes | None:
    """The request's body, or None when it is over MAX_BODY_BYTES (by its Content-Length, else counted as it
    streams). Bytes past the limit are read and dropped, up to DRAIN_BYTES, so that a client still sending
    gets the 413 rather than a reset connection."""
    length = request.headers.get("content-length", "")
    over = length.isdigit() and int(length) > MAX_BODY_BYTES
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        over = over or size > MAX_BODY_BYTES
        if not over:
            chunks.append(chunk)
        elif size > DRAIN_BYTES:
            break
    return None if over else b"".join(chunks)


def replayed(request, body: bytes):
    """A request like `request` whose body (already read) is `body`."""
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


def body_too_large():
    import json

    from starlette.responses import Response

    message = f"request: body over {MAX_BODY_BYTES} bytes; expected at most that ({MAX_IMAGES} images take a few KB)"
    return Response(json.dumps({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": message}), status_code=413,
                    media_type="application/json")


def parse_requests(model_input, description) -> list[tuple[int, int, int | None]]:
    """(n, seed, label) per request row, validated; raises bad_request on anything else."""
    if isinstance(model_input, dict):
        model_input = [model_input]
    if isinstance(model_input, list):
        if not all(isinstance(row, dict) for row in model_input):
            raise bad_request("request: expected rows of {n, seed, label}")
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise bad_request(f"request: expected rows of {{n, seed, label}}, got {type(model_input).__name__}")
    if len(model_input) == 0:
        raise bad_request("request: no rows; expected at least one {n, seed, label}")
    unknown = set(model_input.columns) - {"n", "seed", "label"}
    if unknown:
        names = ", ".join(quote(name) for name in sorted(map(str, unknown)))
        raise bad_request(f"request: unknown field(s) {names}; expected n, seed, label")
    if "n" not in model_input.columns:
        raise bad_request("request: missing field n; expected an integer 1..%d" % MAX_IMAGES)
    requests = []
    for i, row in enumerate(model_input.to_dict("records")):
        n = integer(row.get("n"), f"row {i}: n", 1, MAX_IMAGES, required=True)
        seed = integer(row.get("seed"), f"row {i}: seed", 0, MAX_SEED) or 0
        label = integer(row.get("label"), f"row {i}: label", 0, None)
        check_label(description, label, i)
        requests.append((n, seed, label))
    total = sum(n for n, _, _ in requests)
    if total > MAX_IMAGES:
        raise bad_request(f"request: {total} images in all; expected at most {MAX_IMAGES} per call")
    return requests


def integer(value, what: str, low: int, high: int | None, required: bool = False) -> int | None:
    """An int from a JSON/pandas value; None when absent (NaN counts as absent)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise bad_request(f"{what} is missing; expected an integer {low}..{high}")
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise bad_request(f"{what}={quote(value)}: expected an integer")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise bad_request(f"{what}={quote(value)}: expected an integer")
    value = int(value)
    if value < low or (high is not None and value > high):
        upper = "" if high is None else str(high)
        raise bad_request(f"{what}={value}: expected {low}..{upper}" if upper else f"{what}={value}: expected >= {low}")
    return value


def check_label(description, label: int | None, row: int) -> None:
    """`description`: the model's ModelDescription (anything with kind and num_classes)."""
    num_classes = description.num_classes
    if label is None:
        return
    if not num_classes:
        raise bad_request(f"row {row}: label={label}: this {description.kind} model is unconditional; omit label")
    if label >= num_classes:
        raise bad_request(f"row {row}: label={label}: expected a class index 0..{num_classes - 1}")


def image_labels(description, n: int, label: int | None) -> list[int]:
    """The class of each image, as sampling.class_labels picks it; -1 for an unconditional model."""
    num_classes = description.num_classes
    if not num_classes:
        return [-1] * n
    return [label] * n if label is not None else [i % num_classes for i in range(n)]


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image as an 8-bit PNG: H x W or 1 x H x W grayscale, 3 x H x W RGB (stdlib only: no imaging
    library in the model's env)."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 3:  # C x H x W -> H x W x C
        image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    height, width = image.shape[:2]
    colour_type = 2 if image.ndim == 3 else 0  # truecolour | greyscale

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + np.ascontiguousarray(image[y]).tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    # Any, not long: with long, the scoring server coerces "4" -> 4 and 2.5 -> 2 before predict sees
    # them; parse_requests checks the raw values instead.
    inputs = Schema([ColSpec(AnyType(), "n"), ColSpec(AnyType(), "seed", required=False),
                     ColSpec(AnyType(), "label", required=False)])
    outputs = Schema([ColSpec("long", "request"), ColSpec("long", "index"), ColSpec("long", "label"),
                      ColSpec("string", "png")])
    return ModelSignature(inputs=inputs, outputs=outputs)


INPUT_EXAMPLE = pd.DataFrame({"n": [2], "seed": [0]})


def input_example(description) -> pd.DataFrame:
    """A request the model answers: two images, seed 0, and class 0 for a conditional model."""
    if description.num_classes:
        return pd.DataFrame({"n": [2], "seed": [0], "label": [0]})
    return INPUT_EXAMPLE


def metadata(description) -> dict:
    """What the MLmodel file says about the images (from the model's description): a client can size and
    decode the PNGs without loading the model."""
    return {"imagegen_kind": description.kind, "image_shape": list(description.image_shape),
            "png_mode": "grayscale" if description.channels == 1 else "RGB",
            "classes": list(description.classes), "conditional": bool(description.num_classes)}
