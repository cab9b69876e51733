"""Rewards over HTTP: ``sfgrpo reward-server`` serves any registered reward, the ``remote`` reward calls it.

A reward whose packages clash with the trainer's (ImageReward pins an old timm, say) runs in its own environment or
on another machine. The protocol is JSON with PNG images in base64, never pickle:

- ``GET /info`` -> ``{"protocol": 1, "reward": name, "options": {...}, "describe": "..."}``
- ``POST /score`` with ``{"prompts": [str, ...], "images": [base64 PNG, ...], "metadata": [object, ...] | null}``
  -> 200 ``{"scores": [float | null, ...], "components": {name: [float | null, ...]}}`` (null = missing);
  400 for a malformed request, 413 for one too large, 422 for an input the reward can never score (an OCR prompt
  without quoted text: the client raises it, the run stops naming the prompt), 500 when the reward failed on every
  image (the client marks the batch missing). Every error body is ``{"error": "..."}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from PIL import Image

from . import RewardError, RewardInputError, describe, load, register, score
from .builtin import to_pil_images

log = logging.getLogger(__name__)

PROTOCOL = 1
MAX_REQUEST_BYTES = 256 * 2**20
MAX_IMAGES = 4096
MAX_PIXELS = 4096 * 4096


def encode_png(image: Image.Image) -> str:
    """A PIL image -> base64 text of its PNG file (lossless: the server scores exactly these pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str, field: str) -> Image.Image:
    """base64 PNG text -> RGB PIL image; ValueError naming ``field`` for anything else (or one too large)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError(f"{field}: not base64 text") from None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{field}: not a PNG file")
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{field}: {image.width}x{image.height} is larger than {MAX_PIXELS} pixels")
        return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{field}: unreadable PNG ({error})") from None


def _floats_or_null(values: torch.Tensor) -> list[float | None]:
    return [float(value) if math.isfinite(value) else None for value in values.tolist()]


def parse_score_request(body: bytes) -> tuple[list[Image.Image], list[str], list[dict] | None]:
    """Images, prompts and metadata of a POST /score body; ValueError naming the field that is wrong."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"body: not JSON ({error})") from None
    if not isinstance(request, dict):
        raise ValueError("body: expected a JSON object with 'prompts' and 'images'")
    prompts, images, metadata = request.get("prompts"), request.get("images"), request.get("metadata")
    if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("prompts: expected a list of strings")
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise ValueError("images: expected a list of base64 PNG strings")
    if len(prompts) != len(images):
        raise ValueError(f"prompts: {len(prompts)} prompts for {len(images)} images; give one prompt per image")
    if len(images) > MAX_IMAGES:
        raise ValueError(f"images: {len(images)} images in one request; at most {MAX_IMAGES}")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != len(images)
                                 or not all(isinstance(item, dict) for item in metadata)):
        raise ValueError("metadata: expected null or one JSON object per image")
    return [decode_png(image, f"images[{index}]") for index, image in enumerate(images)], prompts, metadata


class RewardServer(ThreadingHTTPServer):
    """An HTTP server scoring with one loaded reward; requests are scored one at a time (a model is not
    thread-safe), malformed ones are answered with a 4xx and never stop the server."""

    daemon_threads = True

    def __init__(self, name: str, options: dict[str, Any], host: str = "127.0.0.1", port: int = 8790):
        self.reward = load(name, **options)
        self.info = {"protocol": PROTOCOL, "reward": name, "options": options, "describe": describe(name)}
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)

    def _answer(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") == "/info":
            self._answer(HTTPStatus.OK, self.server.info)
        else:
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"no route GET {self.path}; use GET /info or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"no route POST {self.path}; use POST /score"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length: required"})
            return
        if length < 0 or length > MAX_REQUEST_BYTES:
            self.close_connection = True  # the body is not read: do not reuse this connection
            self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         {"error": f"body: {length} bytes; at most {MAX_REQUEST_BYTES} per request (send fewer "
                                   f"images per call)"})
            return
        try:
            images, prompts, metadata = parse_score_request(self.rfile.read(length))
        except ValueError as error:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        try:
            with self.server.lock:
                scores = score(self.server.reward, images, prompts, metadata)
        except RewardInputError as error:
            self._answer(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(error)})
            return
        except Exception as error:  # the reward failed on every image: the client marks the batch missing
            self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"})
            return
        self._answer(HTTPStatus.OK, {"scores": _floats_or_null(scores.values),
                                     "components": {name: _floats_or_null(values)
                                                    for name, values in scores.components.items()}})


class Remote:
    """A reward served by ``sfgrpo reward-server`` at ``url`` (JSON + PNG over HTTP, never pickle).

    Args:
        url: the server, e.g. "http://127.0.0.1:8790".
        timeout: seconds to wait for one answer.
        retries: further attempts after a failed one (connection refused, timeout, 5xx), waiting
            ``backoff * 2**attempt`` seconds before each. When all fail, the batch is marked missing (NaN).
        backoff: seconds before the first retry.
    """

    def __init__(self, url: str = "http://127.0.0.1:8790", timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected http://host:port of a reward server, got {url!r}")
        for field, value in (("timeout", timeout), ("backoff", backoff)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{field}: expected a finite number >= 0, got {value!r}")
        if timeout == 0:
            raise ValueError("timeout: must be > 0 seconds")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: expected a whole number >= 0, got {retries!r}")
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), float(timeout), retries, float(backoff)
        self.last_components: dict[str, torch.Tensor] = {}

    def info(self) -> dict[str, Any]:
        """The server's GET /info (which reward it serves, with which options)."""
        with urllib.request.urlopen(f"{self.url}/info", timeout=self.timeout) as answer:  # noqa: S310 (http only)
            return json.loads(answer.read())

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Scores [B] float32 from the server; all NaN (missing) when every attempt failed."""
        body = json.dumps({"prompts": list(prompts), "images": [encode_png(image) for image in to_pil_images(images)],
                           "metadata": None if metadata is None else list(metadata)}).encode()
        answer = self._post(body)
        self.last_components = {}
        if answer is None:
            return torch.full((len(prompts),), float("nan"))
        self.last_components = {name: _tensor(values) for name, values in answer.get("components", {}).items()}
        return _tensor(answer["scores"])

    def _post(self, body: bytes) -> dict[str, Any] | None:
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{self.url}/score", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310 (http only)
                    return json.loads(answer.read())
            except urllib.error.HTTPError as error:
                message = _error_text(error)
                if error.code == HTTPStatus.UNPROCESSABLE_ENTITY:
                    raise RewardInputError(f"reward server {self.url}: {message}") from None
                if error.code < 500:  # our request is wrong: retrying cannot help
                    raise RewardError(f"reward server {self.url} refused the request ({error.code}): {message}") \
                        from None
                last_error = f"{error.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                last_error = str(getattr(error, "reason", error))
        log.warning("reward server %s failed %d times (last: %s); this batch is marked missing", self.url,
                    self.retries + 1, last_error)
        return None


def _tensor(values: Sequence[float | None]) -> torch.Tensor:
    return torch.tensor([math.nan if value is None else value for value in values], dtype=torch.float32)


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read()).get("error", error.reason))
    except (ValueError, AttributeError):
        return str(error.reason)


register("remote", Remote, replace=False)
