"""`fmnist-pl serve`: an exported model (`fmnist-pl export`) as an HTTP prediction service on LitServe, with
requests batched. LitServe is the optional `serve` extra: pip install "fmnist-pl[serve]".

    fmnist-pl serve --model outputs/latest/export/bn_cnn/model.onnx --port 8000
    curl --data-binary @shirt.png http://127.0.0.1:8000/predict     # or: curl -F image=@shirt.png ...
    curl http://127.0.0.1:8000/health
"""

from __future__ import annotations

import argparse
import io
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from fmnist_pl import layout
from fmnist_pl.errors import DataError, FmnistError
from fmnist_pl.fashion_mnist import CLASS_NAMES
from fmnist_pl.predict_images import read_image

MAX_REQUEST_BYTES = 1 << 20  # a 28×28 PNG is under 2 KB: a body near 1 MB is not one
INSTALL_HINT = 'pip install "fmnist-pl[serve]" (in a checkout: pip install -e ".[serve]")'

try:
    import litserve as ls
    from starlette.requests import Request
    from starlette.responses import JSONResponse
except ImportError:  # the extra is not installed: `serve` says how to add it, everything else works
    ls = None


class RequestRefused(Exception):
    """A request the service answers itself with a 4xx status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


async def read_body(request: Request, limit: int = MAX_REQUEST_BYTES) -> bytes:
    """The request's body, refused (413) as soon as it passes `limit` bytes, without reading the rest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestRefused(413, f"request body is {int(declared):,} bytes; send one 28×28 PNG (at most {limit:,})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestRefused(413, f"request body is over {limit:,} bytes; send one 28×28 PNG")
    return bytes(body)


async def image_pixels(request: Request) -> np.ndarray:
    """The 28×28 grayscale pixels of the PNG in a request: its body, or the one file of a multipart form."""
    body = await read_body(request)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await Request(request.scope, replay(body)).form()
        files = [value for _, value in form.multi_items() if hasattr(value, "read")]
        if len(files) != 1:
            raise RequestRefused(400, f"the form holds {len(files)} files; send one 28×28 PNG")
        body = await files[0].read()
    if not body:
        raise RequestRefused(400, "the request has no body; send one 28×28 PNG")
    try:
        return read_image(io.BytesIO(body), name="the request's image")
    except DataError as e:
        raise RequestRefused(400, str(e)) from None


def replay(body: bytes) -> Callable[[], Awaitable[dict]]:
    """An ASGI `receive` that hands over `body` once, as if it came from the client."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class ImageRequests:
    """ASGI middleware for POST /predict: decodes the PNG in the HTTP server and hands LitServe the pixels as
    JSON, or answers a bad request at once (4xx, one line). Done here, before batching, because LitServe fails
    every request of a batch when decoding one of them raises."""

    def __init__(self, app: Callable, path: str = "/predict") -> None:
        self.app, self.path = app, path

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            pixels = await image_pixels(Request(scope, receive))
        except RequestRefused as e:
            return await JSONResponse({"detail": e.reason}, status_code=e.status)(scope, receive, send)
        payload = json.dumps({"pixels": pixels.tolist()}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await self.app({**scope, "headers": headers}, replay(payload), send)


class FashionMNISTAPI(ls.LitAPI if ls else object):
    """The model behind /predict: 28×28 pixels in, the class and every class's probability out, in batches."""

    def __init__(self, model_path: str, max_batch_size: int = 32, batch_timeout: float = 0.005) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_path = model_path

    def setup(self, device: str) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(self.model_path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        description = Path(self.model_path).with_name(layout.MODEL_DESCRIPTION)
        self.class_names = json.loads(description.read_text())["class_names"] if description.is_file() else CLASS_NAMES

    def decode_request(self, request: dict) -> np.ndarray:
        return np.asarray(request["pixels"], dtype=np.float32)  # checked 28×28 by ImageRequests

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        # A batch (N×28×28), or with --max_batch_size 1 one image, which LitServe passes without batch().
        probabilities = self.session.run(None, {self.input_name: pixels.reshape(-1, *pixels.shape[-2:])})[0]
        return probabilities if pixels.ndim == 3 else probabilities[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probabilities: np.ndarray) -> dict:
        best = int(probabilities.argmax())
        return {
            "class": self.class_names[best],
            "index": best,
            "probabilities": {name: float(p) for name, p in zip(self.class_names, probabilities, strict=True)},
        }


def build_server(model: Path, max_batch_size: int = 32, batch_timeout: float = 0.005, workers: int = 1) -> ls.LitServer:
    """The LitServer for `model` (checked to load first: a bad file is one line here, not a dead worker)."""
    if ls is None:
        raise FmnistError(f"`fmnist-pl serve` needs LitServe, which is not installed: {INSTALL_HINT}")
    if not model.is_file():
        raise FmnistError(f"--model {model}: no such file; pass a model.onnx written by `fmnist-pl export`")
    import onnxruntime

    try:
        onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own error types for a damaged or foreign file
        raise FmnistError(f"--model {model}: not an ONNX model ONNX Runtime can load ({type(e).__name__})") from e
    api = FashionMNISTAPI(str(model), max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    return ls.LitServer(api, accelerator="cpu", workers_per_device=workers, middlewares=[ImageRequests])


def stop_serving(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: LitServe's graceful shutdown, which stops every process it started."""
    raise KeyboardInterrupt


def serve_main(argv: list[str]) -> None:
    """`fmnist-pl serve`: classify PNGs over HTTP with an exported model (POST /predict, GET /health)."""
    parser = argparse.ArgumentParser(prog="fmnist-pl serve", description=serve_main.__doc__)
    parser.add_argument("--model", type=Path, required=True, help="a model.onnx written by `fmnist-pl export`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--max_batch_size", type=int, default=32, help="requests answered together (default 32)")
    parser.add_argument("--batch_timeout", type=float, default=0.005, help="seconds a batch waits to fill")
    parser.add_argument("--workers", type=int, default=1, help="inference processes (default 1)")
    args = parser.parse_args(argv)
    server = build_server(args.model, args.max_batch_size, args.batch_timeout, args.workers)
    # LitServe shuts its HTTP and inference processes down on Ctrl-C only; `kill` would orphan them.
    signal.signal(signal.SIGTERM, stop_serving)
    print(f"fmnist-pl serve: {args.model} at http://{args.host}:{args.port}/predict (POST a 28×28 PNG)", flush=True)
    server.run(host=args.host, port=args.port, generate_client_file=False)
