"""`digitflow api` in-process (FastAPI's TestClient): rows, bounds, swaps, labels.

The real HTTP server (a subprocess on 127.0.0.1) is tests/test_api_http.py; the page in
a real browser is tests/test_api_browser.py.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from flows.api import (
    CHAMPION_TAG_PREFIX,
    Admission,
    ApiSettings,
    Batcher,
    ModelWatcher,
    Refused,
    champion_tag,
    create_app,
)
from flows.cli import app as cli_app
from tasks import prepare_pool
from tasks.labels import store_labelled
from tasks.model import build_model, save_model
from tasks.predict import predict_paths
from tests.images import REFERENCES, big_glyph, photo, png_bytes, png_header_only


def make_model(path: Path, seed: int) -> Path:
    """A valid (untrained, seeded) model file; another seed gives other probabilities."""
    torch.manual_seed(seed)
    return save_model(path, build_model("seed"), "seed", mean=0.13, std=0.31, params={})


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "model.pt", 0)


@pytest.fixture
def settings(model_file: Path, tmp_path: Path) -> ApiSettings:
    return ApiSettings(model=str(model_file), poll_s=0.05, labels_root=str(tmp_path / "labeled"))


def client_for(settings: ApiSettings) -> TestClient:
    return TestClient(create_app(settings))


def jpeg_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


IMAGES = {
    "a.png": png_bytes(REFERENCES[1]),
    "b.png": png_bytes(255 - REFERENCES[2]),  # dark on light
    "c.jpg": jpeg_bytes(photo(big_glyph(3), np.random.default_rng(0), (120, 160))),
    "d.png": png_bytes(np.zeros((28, 28), np.uint8)),  # no ink: status empty
    "e.png": b"\x89PNG\r\n\x1a\n not really",  # error row
}


def multipart(names: list[str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (n, IMAGES[n], "image/png")) for n in names]


def assert_one_line_detail(response, status: int) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    return detail


# --------------------------------------------------------------------------- rows


def test_rows_are_the_cli_jsonl_rows(settings: ApiSettings, model_file: Path, tmp_path: Path):
    """Same bytes, same rows: every field of `digitflow predict --format jsonl`, in order."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in IMAGES.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "pred.jsonl"
    predict_paths([folder], model_file, out, fmt="jsonl", progress=False)
    cli_rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in cli_rows:
        row["path"] = Path(row["path"]).name

    with client_for(settings) as client:
        response = client.post("/predict", files=multipart(sorted(IMAGES)))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    api_rows = response.json()
    assert api_rows == cli_rows
    assert [list(r) for r in api_rows] == [list(r) for r in cli_rows]  # same field order
    assert [r["status"] for r in api_rows] == ["ok", "ok", "ok", "empty", "error"]


def test_raw_body_is_one_row_named_dash(settings: ApiSettings) -> None:
    with client_for(settings) as client:
        form = client.post("/predict", files=multipart(["c.jpg"])).json()
        raw = client.post(
            "/predict", content=IMAGES["c.jpg"], headers={"Content-Type": "image/jpeg"}
        ).json()
    assert len(raw) == 1 and raw[0]["path"] == "-"
    assert {**raw[0], "path": "c.jpg"} == form[0]


def test_input_png_is_the_network_input(settings: ApiSettings) -> None:
    with client_for(settings) as client:
        plain = client.post("/predict", files=multipart(["a.png", "d.png"])).json()
        rows = client.post("/predict?input=true", files=multipart(["a.png", "d.png"])).json()
    assert [{k: v for k, v in r.items() if k != "input_png"} for r in rows] == plain
    img = cv2.imdecode(np.frombuffer(base64.b64decode(rows[0]["input_png"]), np.uint8), 0)
    assert img.shape == (28, 28) and img.max() > 0
    assert rows[1]["input_png"] is None  # empty: the network saw nothing


def test_health_tells_the_model(settings: ApiSettings, model_file: Path) -> None:
    import hashlib

    with client_for(settings) as client:
        health = client.get("/health").json()
        docs = client.get("/docs")
        openapi = client.get("/openapi.json").json()
        page = client.get("/")
    model = health["model"]
    assert model["path"] == str(model_file)
    assert model["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert model["classes"] == [str(d) for d in range(10)] and model["champion"] is None
    assert health["uptime_s"] >= 0 and health["refused"] is None
    assert health["limits"]["max_files"] == settings.max_files
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "multipart/form-data" in openapi["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert page.status_code == 200 and "<canvas" in page.text


# --------------------------------------------------------------------------- bounds


def test_bad_requests_get_one_line_4xx(settings: ApiSettings) -> None:
    small = ApiSettings(**{**settings.__dict__, "max_body_bytes": 4096, "max_files": 2})
    huge_png = png_header_only(50_000, 50_000)  # 2.5 GP: refused from its header
    with client_for(small) as client:
        post = client.post
        detail = assert_one_line_detail(
            post("/predict", content=b"hi", headers={"Content-Type": "text/plain"}), 415
        )
        assert "text/plain" in detail
        assert_one_line_detail(post("/predict", content=b"hi"), 415)  # no Content-Type
        detail = assert_one_line_detail(
            post("/predict", content=IMAGES["e.png"], headers={"Content-Type": "image/png"}), 415
        )
        assert "not an image" in detail or "corrupt" in detail
        detail = assert_one_line_detail(
            post("/predict", content=huge_png, headers={"Content-Type": "image/png"}), 413
        )
        assert "too large" in detail
        assert_one_line_detail(
            post("/predict", content=b"x" * 5000, headers={"Content-Type": "image/png"}), 413
        )
        detail = assert_one_line_detail(post("/predict", files=multipart(["a.png"] * 3)), 413)
        assert "too many files" in detail
        empty = post("/predict", content=b"", headers={"Content-Type": "image/png"})
        assert_one_line_detail(empty, 422)
        assert_one_line_detail(post("/predict", data={"other": "x"}, files=[]), 415)
        form = "multipart/form-data; boundary=XyZ"
        assert_one_line_detail(
            post("/predict", content=b"--XyZ\r\nContent-Disposition: form-data; name=\"files\"",
                 headers={"Content-Type": form}),
            422,
        )  # fmt: skip
        assert_one_line_detail(
            post("/predict", content=b"--XyZ--\r\n", headers={"Content-Type": form}), 422
        )
        assert_one_line_detail(
            post("/predict", content=b"--XyZ--", headers={"Content-Type": "multipart/form-data"}),
            422,
        )
        no_files = (
            b'--XyZ\r\nContent-Disposition: form-data; name="other"\r\n\r\nvalue\r\n--XyZ--\r\n'
        )
        detail = assert_one_line_detail(
            post("/predict", content=no_files, headers={"Content-Type": form}), 422
        )
        assert "files" in detail
        assert_one_line_detail(post("/predict?input=maybe", files=multipart(["a.png"])), 422)
        assert_one_line_detail(client.get("/predict"), 405)


def test_one_bad_file_among_good_ones_is_an_error_row(settings: ApiSettings) -> None:
    with client_for(settings) as client:
        response = client.post("/predict", files=multipart(["e.png", "a.png"]))
    assert response.status_code == 200
    assert [r["status"] for r in response.json()] == ["error", "ok"]


def test_a_bug_on_one_image_is_its_error_row_not_a_500(
    settings: ApiSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: decoding raises an unexpected exception (a bug) for one upload.

    Among others, the upload's row says so and the others are answered; alone (a raw
    body), it is a 500 with that one-line message, not a crash.
    """
    real_prepare = prepare_pool.prepare_file

    def buggy(path: str, preprocess: bool = True):  # a bug only on the undecodable upload
        if Path(path).read_bytes() == IMAGES["e.png"]:
            raise KeyError("bug")
        return real_prepare(path, preprocess=preprocess)

    monkeypatch.setattr(prepare_pool, "prepare_file", buggy)
    with client_for(settings) as client:
        form = client.post("/predict", files=multipart(["e.png", "a.png"]))
        raw = client.post(
            "/predict", content=IMAGES["e.png"], headers={"Content-Type": "image/png"}
        )
    assert form.status_code == 200
    assert [r["status"] for r in form.json()] == ["error", "ok"]
    assert form.json()[0]["message"] == "internal error: KeyError: 'bug'"
    assert assert_one_line_detail(raw, 500) == "-: internal error: KeyError: 'bug'"


def test_admission_is_bounded(settings: ApiSettings) -> None:
    """Past compute_slots + queue admitted requests, the next one is 503 at once."""
    admission = Admission(ApiSettings(**{**settings.__dict__, "compute_slots": 1, "queue": 1}))
    with admission.admit(), admission.admit():
        with pytest.raises(Refused) as err, admission.admit():
            pass
        assert err.value.status_code == 503 and err.value.headers == {"Retry-After": "1"}
    with admission.admit():  # given back
        pass
    admission.executor.shutdown()


def test_time_limit_answers_instead_of_hanging(settings: ApiSettings) -> None:
    tight = ApiSettings(**{**settings.__dict__, "time_limit_s": 1e-9})
    with client_for(tight) as client:
        response = client.post("/predict", files=multipart(["a.png"]))
    assert response.status_code in (408, 503)
    assert_one_line_detail(response, response.status_code)


# --------------------------------------------------------------------------- swaps


def test_watcher_swaps_a_good_file_and_refuses_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_model(tmp_path / "model.pt", 0)
    watcher = ModelWatcher(str(path), poll_s=0.05)
    first = watcher.current
    watcher.poll()
    assert watcher.current is first  # nothing changed

    make_model(tmp_path / "model.pt", 1)  # atomic replace: a new inode
    watcher.poll()  # seen; waits one poll for the file to hold still
    assert watcher.current is first
    watcher.poll()
    second = watcher.current
    assert second is not first and second.sha256 != first.sha256 and watcher.swaps == 1

    caplog.set_level(logging.INFO, logger="flows.api")
    (tmp_path / "model.pt").write_bytes(b"not a model at all")
    watcher.poll()
    watcher.poll()
    assert watcher.current is second
    assert watcher.refused is not None and watcher.refused["path"] == str(path)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "\n" not in refusals[0].getMessage()
    watcher.poll()
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1  # logged once


def test_requests_of_both_models_in_one_batch_each_get_their_own(tmp_path: Path) -> None:
    """A request that took the old model before a swap is computed on it, even batched."""
    path = make_model(tmp_path / "model.pt", 0)
    watcher = ModelWatcher(str(path), poll_s=3600)
    old = watcher.current
    make_model(path, 1)
    watcher.poll()
    watcher.poll()
    new = watcher.current
    assert new is not old
    img = REFERENCES[5]
    batcher = Batcher()
    try:
        futures = [batcher.submit(m, [img, img]) for m in (old, new, old)]
        got = [f.result(timeout=30) for f in futures]
    finally:
        batcher.close()
    expected_old = old.classifier.probabilities([img, img])
    expected_new = new.classifier.probabilities([img, img])
    np.testing.assert_allclose(got[0], expected_old, atol=1e-6)
    np.testing.assert_allclose(got[2], expected_old, atol=1e-6)
    np.testing.assert_allclose(got[1], expected_new, atol=1e-6)
    assert not np.allclose(expected_old, expected_new, atol=1e-6)


def test_health_shows_the_swapped_model(tmp_path: Path) -> None:
    path = make_model(tmp_path / "model.pt", 0)
    app = create_app(ApiSettings(model=str(path), poll_s=3600))  # polled by hand here
    with TestClient(app) as client:
        before = client.get("/health").json()["model"]["sha256"]
        r1 = client.post("/predict", files=multipart(["a.png"]))
        make_model(path, 1)
        app.state.watcher.poll()
        app.state.watcher.poll()
        health = client.get("/health").json()
        r2 = client.post("/predict", files=multipart(["a.png"]))
    assert health["model"]["sha256"] != before and health["swaps"] == 1
    assert r1.headers["X-Model-SHA256"] == before
    assert r2.headers["X-Model-SHA256"] == health["model"]["sha256"]
    assert r1.json()[0]["p0"] != r2.json()[0]["p0"]


def test_champion_tag_found_from_dvc_lock(tmp_path: Path) -> None:
    import hashlib

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    model = make_model(tmp_path / "data/models/robust/model.pt", 0)
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    lock = {"stages": {"train@robust": {"outs": [{"path": "data/models/robust/model.pt",
                                                  "md5": md5}]}}}  # fmt: skip
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))
    git("init", "-q")
    git("add", "dvc.yaml", "dvc.lock")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m")
    git("-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "model@v1", "-m", "v1")
    git("-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "model@v2", "-m", "v2")
    assert champion_tag(model, md5) == "model@v2"  # the newest tag holding it
    assert champion_tag(model, "0" * 32) is None
    assert champion_tag(tmp_path / "elsewhere.pt", md5) is None
    assert ModelWatcher(str(model), 1.0).current.champion == "model@v2"


def test_tag_prefix_is_the_pipelines() -> None:
    from flows.pipeline import TAG_PREFIX

    assert CHAMPION_TAG_PREFIX == TAG_PREFIX


# --------------------------------------------------------------------------- labels


def test_labels_are_stored_deduplicated(settings: ApiSettings) -> None:
    with client_for(settings) as client:
        assert_one_line_detail(
            client.post("/label?label=3", content=IMAGES["a.png"],
                        headers={"Content-Type": "image/png"}),
            403,
        )  # fmt: skip
    accepting = ApiSettings(**{**settings.__dict__, "accept_labels": True})
    root = Path(accepting.labels_root)
    with client_for(accepting) as client:
        first = client.post("/label?label=3", content=IMAGES["a.png"])
        again = client.post("/label?label=3", content=IMAGES["a.png"])
        jpeg = client.post("/label?label=3", content=IMAGES["c.jpg"])
        assert_one_line_detail(client.post("/label?label=10", content=IMAGES["a.png"]), 422)
        assert_one_line_detail(client.post("/label", content=IMAGES["a.png"]), 422)
        assert_one_line_detail(client.post("/label?label=1", content=b"hello"), 415)
    assert first.status_code == again.status_code == jpeg.status_code == 200
    assert first.json()["stored"] == again.json()["stored"]
    files = sorted(p.name for p in (root / "3").iterdir())
    assert len(files) == 2 and {Path(f).suffix for f in files} == {".png", ".jpg"}
    assert not list(root.glob("*/.*"))  # no temp files left


def test_store_labelled(tmp_path: Path) -> None:
    import hashlib

    data = IMAGES["a.png"]
    path = store_labelled(data, 7, tmp_path, ".png")
    assert path == tmp_path / "7" / f"{hashlib.sha256(data).hexdigest()}.png"
    assert path.read_bytes() == data
    mtime = path.stat().st_mtime_ns
    assert store_labelled(data, 7, tmp_path, ".png") == path
    assert path.stat().st_mtime_ns == mtime  # not written again
    for label, suffix, blob in [(10, ".png", data), (-1, ".png", data), (True, ".png", data),
                                (1, "png", data), (1, "./x", data), (1, ".png", b"")]:  # fmt: skip
        with pytest.raises(ValueError):
            store_labelled(blob, label, tmp_path, suffix)


# --------------------------------------------------------------------------- CLI


def test_cli_command_is_registered_and_refuses_a_bad_model(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli_app, ["api", "--help"])
    assert result.exit_code == 0 and "--accept-labels" in result.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    result = runner.invoke(cli_app, ["api", "--model", str(bad), "--port", "1"])
    assert result.exit_code == 2
    result = runner.invoke(cli_app, ["api", "--model", str(tmp_path / "none.pt")])
    assert result.exit_code == 2 and "not found" in result.output
