"""`mlflow models serve` on a registered champion: images for good requests, HTTP 400 for bad ones."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from imagegen.config import load_config
from imagegen.evaluation.sampling import generate
from imagegen.models.io import load_model
from imagegen.registry import run_register
from imagegen.serving import MAX_IMAGES
from tests.helpers import cli_env, decode_png, free_port, make_project, start, stop

pytestmark = pytest.mark.slow

MODEL = "mnist-gan"  # not a fashion-mnist name: the registry tests reset those


@pytest.fixture(scope="module")
def served(tmp_path_factory, tracking_server):
    """A conditional GAN registered as mnist-gan@champion on the shared server, served on 127.0.0.1."""
    import mlflow

    root = make_project(tmp_path_factory.mktemp("serving"), seed=7, fid={"gan": 30.0, "vae": 40.0},
                        dataset="mnist", conditional=True)
    mlflow.set_tracking_uri(tracking_server)
    try:
        run_register(load_config(root / "params.yaml"), root)
    finally:
        mlflow.set_tracking_uri(None)
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    proc = start(cmd, root / "serve.log", f"http://127.0.0.1:{port}/ping", env=cli_env(tracking_server), cwd=root)
    yield f"http://127.0.0.1:{port}", root
    stop(proc)


def post(url: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_images_come_back_as_base64_png_rows(served):
    url, root = served
    status, body = post(url, {"dataframe_records": [{"n": 4, "seed": 1}]})
    assert status == 200, body
    rows = body["predictions"]
    assert [(r["request"], r["index"]) for r in rows] == [(0, i) for i in range(4)]
    assert [r["label"] for r in rows] == [0, 1, 2, 3]  # a conditional model cycles through the classes
    images = np.stack([decode_png(r["png"]) for r in rows])
    module, meta = load_model(root / "models" / "gan")
    assert images.dtype == np.uint8 and np.array_equal(images, generate(module, meta, 4, seed=1)[:, 0])


def test_inputs_and_split_formats_and_several_rows(served):
    url, _ = served
    status, body = post(url, {"inputs": [{"n": 2, "label": 7}]})
    assert status == 200, body
    assert [r["label"] for r in body["predictions"]] == [7, 7]
    status, body = post(url, {"dataframe_split": {"columns": ["n", "seed"], "data": [[1, 5], [2, 6]]}})
    assert status == 200, body
    assert [r["request"] for r in body["predictions"]] == [0, 1, 1]
    status, body = post(url, {"dataframe_records": [{"n": 1}, {"n": 1, "label": 2}]})  # label on one row only
    assert status == 200, body
    assert [r["label"] for r in body["predictions"]] == [0, 2]


@pytest.mark.parametrize("rows, words", [
    ([{"n": 0}], "n=0"),
    ([{"n": MAX_IMAGES + 1}], f"n={MAX_IMAGES + 1}"),
    ([{"n": 1, "label": 10}], "label=10"),
    ([{"n": "four"}], "n='four': expected an integer"),
    ([{"n": "4"}], "n='4': expected an integer"),
    ([{"n": 2.5}], "n=2.5: expected an integer"),
    ([{"n": True}], "n=True: expected an integer"),
    ([{"n": None}], "n is missing"),
    ([{"n": 1, "seed": "x"}], "seed='x': expected an integer"),
    ([{"seed": 3}], "missing inputs ['n']"),
    ([{"n": 1000}, {"n": 100}], "1100 images in all"),
])
def test_bad_requests_are_400_with_a_message_and_no_traceback(served, rows, words):
    url, _ = served
    status, body = post(url, {"dataframe_records": rows})
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and words in body["message"]
    assert "stack_trace" not in body and "Traceback" not in json.dumps(body)


def post_raw(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_bad_request_is_not_echoed_back(served):
    """900 KB of garbage, or a 900 KB value, is answered with a short 400, not with the input."""
    from imagegen.serving import MAX_ERROR_CHARS

    url, _ = served
    garbage = np.random.default_rng(0).integers(0, 256, 900 << 10, dtype=np.uint8).tobytes()
    for body in (garbage, json.dumps({"dataframe_records": [{"n": "x" * (900 << 10)}]}).encode()):
        status, answer = post_raw(url, body)
        assert status == 400
        assert len(answer) < 2048, answer[:300]
        assert len(json.loads(answer)["message"]) < MAX_ERROR_CHARS + 40
        assert json.loads(answer)["error_code"] in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE")


def test_an_oversized_body_is_413_before_it_is_parsed(served):
    """11 MB of valid rows (parsed, they would cost about 700 MB and seconds): refused by the Content-Length, and
    sent chunked (no length), by the bytes counted as they stream; 413 and one line, not 400 after parsing."""
    import http.client
    from urllib.parse import urlsplit

    from imagegen.serving import MAX_BODY_BYTES

    url, _ = served
    body = b'{"dataframe_records": [' + b'{"n": 1}, ' * (11 * 2**20 // 10) + b'{"n": 1}]}'
    expected = {"error_code": "REQUEST_LIMIT_EXCEEDED",
                "message": f"request: body over {MAX_BODY_BYTES} bytes; expected at most that (1024 images take a few KB)"}
    status, answer = post_raw(url, body)
    assert (status, json.loads(answer)) == (413, expected)

    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    try:
        connection.request("POST", "/invocations", body=(body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        assert (response.status, json.loads(response.read())) == (413, expected)
    finally:
        connection.close()
    status, answer = post(url, {"dataframe_records": [{"n": 1}]})  # the server is still there
    assert status == 200, answer
