"""Request validation and PNG encoding of the served model (no MLflow server needed)."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from imagegen.models.description import ModelDescription
from imagegen.serving import MAX_IMAGES, image_labels, parse_requests, png_base64
from tests.helpers import decode_png

CONDITIONAL = ModelDescription("gan", {}, 10)
UNCONDITIONAL = ModelDescription("vae", {}, 0)


def test_rows_dicts_and_frames_parse_alike():
    assert parse_requests({"n": 3}, UNCONDITIONAL) == [(3, 0, None)]
    assert parse_requests([{"n": 1, "seed": 5}, {"n": 2, "seed": 6}], UNCONDITIONAL) == [(1, 5, None), (2, 6, None)]
    frame = pd.DataFrame({"n": [4], "seed": [7], "label": [9]})
    assert parse_requests(frame, CONDITIONAL) == [(4, 7, 9)]
    assert parse_requests(pd.DataFrame({"n": [2.0], "label": [np.nan]}), CONDITIONAL) == [(2, 0, None)]


@pytest.mark.parametrize("request_, meta, words", [
    ({"n": 0}, UNCONDITIONAL, "n=0"),
    ({"n": MAX_IMAGES + 1}, UNCONDITIONAL, f"n={MAX_IMAGES + 1}"),
    ({"n": "4"}, UNCONDITIONAL, "expected an integer"),
    ({"n": 2.5}, UNCONDITIONAL, "expected an integer"),
    ({"n": True}, UNCONDITIONAL, "expected an integer"),
    ({"seed": 1}, UNCONDITIONAL, "missing field n"),
    ({"n": 1, "seed": -1}, UNCONDITIONAL, "seed=-1"),
    ({"n": 1, "label": 3}, UNCONDITIONAL, "unconditional"),
    ({"n": 1, "label": 10}, CONDITIONAL, "0..9"),
    ({"n": 1, "label": -1}, CONDITIONAL, "label=-1"),
    ({"n": 1, "colour": 2}, UNCONDITIONAL, "unknown field"),
    ([{"n": 1000}, {"n": 25}], UNCONDITIONAL, "1025 images in all"),
    ([], UNCONDITIONAL, "no rows"),
    ("n=4", UNCONDITIONAL, "expected rows"),
])
def test_bad_requests_are_invalid_parameter_errors(request_, meta, words):
    with pytest.raises(MlflowException) as caught:
        parse_requests(request_, meta)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.get_http_status_code() == 400
    assert words in caught.value.message


def test_image_labels_follow_sampling_order():
    assert image_labels(CONDITIONAL, 12, None) == [*range(10), 0, 1]
    assert image_labels(CONDITIONAL, 2, 4) == [4, 4]
    assert image_labels(UNCONDITIONAL, 2, None) == [-1, -1]


def test_png_round_trips_and_is_a_real_png():
    image = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
    encoded = png_base64(image)
    assert np.array_equal(decode_png(encoded), image)
    PIL = pytest.importorskip("PIL.Image")
    decoded = PIL.open(io.BytesIO(base64.b64decode(encoded)))
    assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), image)


def test_long_values_are_quoted_short():
    with pytest.raises(MlflowException) as caught:
        parse_requests({"n": "7" * 100_000}, UNCONDITIONAL)
    assert caught.value.message.startswith("row 0: n='7777") and caught.value.message.endswith(
        "... (99962 more characters): expected an integer")
    assert len(caught.value.message) < 120


def test_the_scoring_server_caps_error_answers(tmp_path):
    """MLflow's scoring app around a real saved pyfunc model: a non-JSON body is not echoed back."""
    import mlflow.pyfunc
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from imagegen import serving
    from tests.helpers import make_model

    make_model(tmp_path / "gan", "gan", seed=0)
    mlflow.pyfunc.save_model(tmp_path / "pyfunc", python_model=serving.ImageSampler(),
                             artifacts={serving.MODEL_ARTIFACT: str(tmp_path / "gan")},
                             signature=serving.signature(), pip_requirements=["torch"])
    app = scoring_server.init(mlflow.pyfunc.load_model(str(tmp_path / "pyfunc")))
    client = TestClient(app)
    garbage = b"\xff" + bytes(range(256)) * 2048  # 512 KB, not JSON, not UTF-8
    answer = client.post("/invocations", content=garbage, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert len(answer.content) < 2048
    message = answer.json()["message"]
    assert len(message) < serving.MAX_ERROR_CHARS + 40 and message.endswith("more characters)")
    good = client.post("/invocations", json={"dataframe_records": [{"n": 2}]})
    assert good.status_code == 200 and len(good.json()["predictions"]) == 2

    # 11 MB of valid rows: 413 and one line, with a Content-Length and sent chunked (counted as it streams)
    body = b'{"dataframe_records": [' + b'{"n": 1}, ' * (11 * 2**20 // 10) + b'{"n": 1}]}'
    for content in (body, (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20))):
        answer = client.post("/invocations", content=content, headers={"Content-Type": "application/json"})
        assert answer.status_code == 413
        assert answer.json()["message"] == (f"request: body over {serving.MAX_BODY_BYTES} bytes; expected at most "
                                            "that (1024 images take a few KB)")
