"""The reward server and the ``remote`` reward on loopback: JSON + PNG both ways, clear 4xx for malformed requests
(the server keeps serving), bounded retries, and a failed call that marks its batch missing."""

import http.client
import json
import pathlib
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from sfgrpo_core import rewards
from sfgrpo_core.rewards.builtin import to_pil_images
from sfgrpo_core.rewards.remote import Remote, RewardServer, encode_png

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _images(count=3, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (count, 24, 24, 3), dtype=np.uint8))


class _Serving:
    def __init__(self, name, options=None):
        self.server = RewardServer(name, options or {}, port=0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    started = []

    def start(name, options=None):
        started.append(_Serving(name, options))
        return started[-1].server

    yield start
    for serving in started:
        serving.close()


def _post(server, body: bytes, path="/score", headers=None):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    answer = connection.getresponse()
    payload = json.loads(answer.read())
    connection.close()
    return answer.status, payload


def test_remote_scores_equal_local_scores_and_carry_components(serve):
    images, prompts = _images(), ["a", "b", "c"]
    server = serve("weighted", {"components": {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}})
    remote = rewards.load("remote", url=server.url, retries=0)
    assert remote.info()["reward"] == "weighted"
    scored = rewards.score(remote, images, prompts)
    local = rewards.score(rewards.load("weighted", components={"jpeg_compressibility": 1.0,
                                                              "jpeg_incompressibility": 0.5}), images, prompts)
    torch.testing.assert_close(scored.values, local.values)  # PNG is lossless: the same pixels are scored
    assert set(scored.components) == {"jpeg_compressibility", "jpeg_incompressibility"}
    torch.testing.assert_close(scored.components["jpeg_incompressibility"], local.components["jpeg_incompressibility"])


def test_missing_scores_travel_as_null_and_come_back_as_nan(serve):
    rewards.register("test_nan_on_second", lambda: (lambda images, prompts, metadata=None:
                                                     torch.tensor([1.0, float("nan"), 3.0])))
    server = serve("test_nan_on_second")
    status, payload = _post(server, json.dumps({"prompts": ["a"] * 3, "images": [
        encode_png(image) for image in to_pil_images(_images())]}).encode())
    assert status == 200 and payload["scores"] == [1.0, None, 3.0]
    scores = Remote(server.url, retries=0)(_images(), ["a"] * 3)
    assert torch.isnan(scores[1]) and scores[2] == 3.0


@pytest.mark.parametrize("body, field", [
    (b"{not json", "body: not JSON"),
    (b"[1, 2]", "body: expected a JSON object"),
    (json.dumps({"prompts": "a", "images": []}).encode(), "prompts: expected a list of strings"),
    (json.dumps({"prompts": ["a"], "images": [1]}).encode(), "images: expected a list of base64 PNG strings"),
    (json.dumps({"prompts": ["a", "b"], "images": ["AAAA"]}).encode(), "prompts: 2 prompts for 1 images"),
    (json.dumps({"prompts": ["a"], "images": ["%%%"]}).encode(), "images[0]: not base64"),
    (json.dumps({"prompts": ["a"], "images": ["aGVsbG8="]}).encode(), "images[0]: not a PNG file"),
    (json.dumps({"prompts": ["a"], "images": ["iVBORw0KGgoAAAA="]}).encode(), "images[0]: unreadable PNG"),
    (json.dumps({"prompts": ["a"], "images": ["iVBORw0KGgo="], "metadata": 3}).encode(), "metadata: expected"),
])
def test_malformed_requests_get_a_clear_400_and_the_server_keeps_serving(serve, body, field):
    server = serve("jpeg_compressibility")
    status, payload = _post(server, body)
    assert status == 400 and payload["error"].startswith(field), payload
    assert torch.isfinite(Remote(server.url, retries=0)(_images(1), ["a"])).all()


def test_unknown_routes_and_oversized_bodies_are_refused(serve):
    server = serve("jpeg_compressibility")
    assert _post(server, b"{}", path="/predict")[0] == 404
    status, payload = _post(server, b"{}", headers={"Content-Length": str(2**40)})
    assert status == 413 and "at most" in payload["error"]
    assert torch.isfinite(Remote(server.url, retries=0)(_images(1), ["a"])).all()


def test_an_input_the_reward_can_never_score_stops_the_client(serve):
    def needs_quotes(images, prompts, metadata=None):
        raise rewards.RewardInputError(f"prompt {prompts[0]!r} has no quoted text")

    rewards.register("test_needs_quotes", lambda: needs_quotes)
    server = serve("test_needs_quotes")
    with pytest.raises(rewards.RewardInputError, match="prompt 'a cat' has no quoted text"):
        rewards.score(Remote(server.url, retries=3), _images(1), ["a cat"])


def test_a_failing_server_is_retried_then_the_batch_is_missing(serve):
    calls = []

    def broken(images, prompts, metadata=None):
        calls.append(len(prompts))
        raise RuntimeError("out of memory")

    rewards.register("test_broken", lambda: broken)
    server = serve("test_broken")
    scores = Remote(server.url, retries=2, backoff=0.01)(_images(2), ["a", "b"])
    assert torch.isnan(scores).all()
    assert len(calls) == 3 * 3  # 3 attempts; each: the batch, then every image alone (rewards.score's fallback)


def test_a_server_that_is_not_there_marks_the_batch_missing():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scores = Remote(f"http://127.0.0.1:{port}", retries=1, backoff=0.01, timeout=5)(_images(2), ["a", "b"])
    assert torch.isnan(scores).all()


@pytest.mark.parametrize("options, field", [
    ({"url": "127.0.0.1:8790"}, "url"), ({"timeout": float("nan")}, "timeout"), ({"timeout": 0}, "timeout"),
    ({"backoff": float("inf")}, "backoff"), ({"retries": -1}, "retries"), ({"retries": 1.5}, "retries"),
])
def test_remote_refuses_bad_options_naming_them(options, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        Remote(**options)


@pytest.mark.slow  # a subprocess or an install: left out by make test-fast
def test_the_cli_serves_a_reward_until_stopped():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "sfgrpo_core.cli", "reward-server", "--reward",
                                "jpeg_incompressibility", "--options", '{"quality": 70}', "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith(f"serving reward 'jpeg_incompressibility' at "
                                                     f"http://127.0.0.1:{port}")
        remote = Remote(f"http://127.0.0.1:{port}", retries=0)
        assert remote.info()["options"] == {"quality": 70}
        torch.testing.assert_close(remote(_images(), ["a"] * 3),
                                   rewards.load("jpeg_incompressibility", quality=70)(_images(), ["a"] * 3))
    finally:
        process.terminate()
        process.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", "reward-server", "--reward", "nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown reward 'nope'" in bad.stderr
    not_finite = subprocess.run([sys.executable, "-m", "sfgrpo_core.cli", "reward-server", "--reward",
                                 "jpeg_incompressibility", "--options", '{"quality": NaN}'],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert not_finite.returncode == 2 and "--options: NaN is not a finite number" in not_finite.stderr
