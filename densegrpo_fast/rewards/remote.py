"""Rewards over HTTP: `densegrpo reward-server` serves any registered reward; the `remote` component calls it.

Protocol (JSON; images as PNG bytes, base64 — a network payload is never unpickled):
  POST /score   {"prompts": [str, ...], "images": [base64 PNG (H, W, 3) uint8, ...]}
           ->   {"scores": [float, ...]}            (one per image)
  GET  /health  -> {"reward": NAME}
An optional bearer token (`--token` / component `token`) is required in `Authorization: Bearer <token>`.
Client: a per-call timeout (`timeout_s`), bounded retries with exponential backoff (`retries`), then a RewardError
naming the URL and the last error — which the trainer turns into a stop on every rank (no hang, no silent zero).
"""
from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .registry import RewardError, register


def encode_png(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


@register("remote")
def remote(_cfg=None, url: Optional[str] = None, timeout_s: float = 60.0, retries: int = 3, token=None,
           batch_size: int = 64, device=None):
    if not url:
        raise RewardError("remote reward: reward.components.<name>.url is required (http://host:port)")
    endpoint = url.rstrip("/") + "/score"

    def call(images_u8: np.ndarray, prompts: list[str]) -> list:
        body = json.dumps({"prompts": prompts, "images": [encode_png(im) for im in images_u8]}).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        last = None
        for attempt in range(int(retries) + 1):
            if attempt:
                time.sleep(min(8.0, 0.25 * 2 ** (attempt - 1)))      # 0.25, 0.5, 1, ... s
            try:
                req = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=float(timeout_s)) as resp:
                    reply = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:200]!r}"
                if exc.code in (400, 401, 403, 404):               # not worth retrying
                    break
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
                continue
            except json.JSONDecodeError as exc:
                raise RewardError(f"remote reward {endpoint}: the reply is not JSON ({exc})") from exc
            scores = reply.get("scores") if isinstance(reply, dict) else None
            if not isinstance(scores, list) or len(scores) != len(prompts) or \
                    not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
                raise RewardError(f"remote reward {endpoint}: malformed reply, expected {{\"scores\": "
                                  f"[{len(prompts)} numbers]}}, got {str(reply)[:200]}")
            return scores
        raise RewardError(f"remote reward {endpoint}: no answer after {int(retries) + 1} attempt(s) "
                          f"(timeout {timeout_s} s); last error: {last}")

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from .jpeg import to_uint8
        u8 = to_uint8(images)
        out = []
        for s in range(0, len(prompts), int(batch_size)):
            out += call(u8[s:s + int(batch_size)], prompts[s:s + int(batch_size)])
        return torch.tensor(out, dtype=torch.float32)
    return reward


def make_server(reward_name: str, host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None,
                max_requests: int = 0, delay_s: float = 0.0, options: Optional[dict] = None) -> ThreadingHTTPServer:
    """A threading HTTP server scoring with the registered reward `reward_name` (its factory gets `options`).
    max_requests > 0 closes the server after that many /score requests (tests: a server that dies mid-run);
    delay_s sleeps before each reply (tests: a slow server)."""
    from .registry import REWARDS
    if reward_name not in REWARDS or reward_name == "remote":
        raise SystemExit(f"reward-server: unknown reward {reward_name!r}; available: "
                         f"{', '.join(sorted(k for k in REWARDS if k != 'remote'))}")
    fn = REWARDS[reward_name](None, **(options or {}))
    state = {"served": 0, "posts": 0}   # posts: every POST received, answered or refused

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                self._send(401, {"error": "missing or wrong bearer token"})
                return False
            return True

        def do_GET(self):
            if self.path == "/health" and self._authorised():
                self._send(200, {"reward": reward_name})
            elif self.path != "/health":
                self._send(404, {"error": "not found"})

        def do_POST(self):
            state["posts"] += 1
            if self.path != "/score":
                return self._send(404, {"error": "not found"})
            if not self._authorised():
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompts, images = req["prompts"], req["images"]
                if not isinstance(prompts, list) or not isinstance(images, list) or len(prompts) != len(images):
                    raise ValueError("'prompts' and 'images' must be lists of the same length")
                arr = np.stack([decode_png(s) for s in images]) if images else np.zeros((0, 1, 1, 3), np.uint8)
            except Exception as exc:
                return self._send(400, {"error": f"bad request: {type(exc).__name__}: {exc}"})
            if delay_s:
                time.sleep(delay_s)
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
            try:
                scores = torch.as_tensor(fn(x, prompts), dtype=torch.float32).reshape(-1).tolist()
            except Exception as exc:
                return self._send(500, {"error": f"{reward_name} failed: {type(exc).__name__}: {exc}"})
            self._send(200, {"scores": scores})
            state["served"] += 1
            if max_requests and state["served"] >= max_requests:
                import threading
                threading.Thread(target=self.server.shutdown, daemon=True).start()

    server = ThreadingHTTPServer((host, port), Handler)
    server.stats = state
    return server


def server_main(argv) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="densegrpo reward-server", description="serve a registered reward over HTTP")
    p.add_argument("--reward", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN'")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the reward's factory (e.g. path=/models/pickscore)")
    p.add_argument("--max-requests", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    opts = dict(o.split("=", 1) for o in a.option)
    srv = make_server(a.reward, a.host, a.port, a.token, a.max_requests, a.delay_s, opts)
    print(f"reward-server: {a.reward} on http://{a.host}:{srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    srv.server_close()
    return 0
