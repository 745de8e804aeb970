"""Remote rewards on 127.0.0.1: the same scores as the local reward, timeouts, malformed replies, a token, and a
server that dies mid-run (the run stops naming the URL, the checkpoint stays, --resume continues)."""
import json
import os
import socket
import subprocess
import threading

import pytest
import torch

from densegrpo_fast.rewards import CombinedReward, RewardError
from densegrpo_fast.rewards.remote import make_server
from conftest import PY, ROOT


def _serve(**kw):
    srv = make_server("jpeg_compressibility", "127.0.0.1", 0, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def _imgs(n=5):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_remote_equals_local_and_checks_the_token():
    srv, url = _serve(token="s3cret")
    try:
        local, _ = CombinedReward({"jpeg_compressibility": 1.0})(_imgs(), ["p"] * 5)
        r = CombinedReward({}, components={"remote": {"weight": 1.0, "url": url, "token": "s3cret",
                                                      "batch_size": 2}})
        got, _ = r(_imgs(), ["p"] * 5)
        torch.testing.assert_close(got, local, rtol=0, atol=0)  # PNG is lossless on the uint8 the reward sees
        bad = CombinedReward({}, components={"remote": {"weight": 1.0, "url": url, "token": "wrong", "retries": 5}})
        posts = srv.stats["posts"]
        with pytest.raises(RewardError, match=r"score: no answer .*HTTP 401"):
            bad(_imgs(1), ["p"])
        assert srv.stats["posts"] - posts == 1  # an auth error is not retried (retries=5 would send 6)
    finally:
        srv.shutdown()


def test_slow_dead_and_malformed_servers_are_clear_errors():
    srv, url = _serve(delay_s=2.0)
    try:
        r = CombinedReward({}, components={"remote": {"weight": 1.0, "url": url, "timeout_s": 0.3, "retries": 1}})
        with pytest.raises(RewardError, match=rf"{url}/score: no answer after 2 attempt\(s\) \(timeout 0.3 s\)"):
            r(_imgs(1), ["p"])
    finally:
        srv.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = CombinedReward({}, components={"remote": {"weight": 1.0, "url": dead, "retries": 2}})
    with pytest.raises(RewardError, match=r"no answer after 3 attempt\(s\).*last error: URLError"):
        r(_imgs(1), ["p"])
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Odd(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"scores": [1.0, "x"]}' if "/score" in self.path else b"{}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    odd = ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=odd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{odd.server_address[1]}"
        r = CombinedReward({}, components={"remote": {"weight": 1.0, "url": url}})
        with pytest.raises(RewardError, match=r"malformed reply, expected \{\"scores\": \[2 numbers\]\}"):
            r(_imgs(2), ["p", "q"])
    finally:
        odd.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_server_dying_mid_run_stops_the_run_and_resume_continues(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = [PY, "-m", "densegrpo_fast.cli", "reward-server", "--reward", "jpeg_compressibility", "--port",
              str(port)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # 2 prompts x 4 = 8 trajectories, sample_batch 8: one reward request per epoch; the server dies after 2
    srv = subprocess.Popen(server + ["--max-requests", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert "reward-server" in srv.stdout.readline()
    run = str(tmp_path / "run")
    args = [PY, "train.py", "--config", "configs/tiny_jpeg.yaml", "--run-dir", run, "--set", "run.progress=false",
            "--set", "sampling.steps=3", "--set", "train.prompts_per_epoch=2", "--set", "run.epochs=4",
            "--set", f"reward.components={{remote: {{weight: 1.0, url: '{url}', timeout_s: 5, retries: 2}}}}",
            "--set", "reward.weights={jpeg_compressibility: 1.0}"]
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    srv.wait(timeout=60)
    assert r.returncode != 0 and f"remote reward {url}/score: no answer" in r.stderr, r.stderr[-2000:]
    with open(os.path.join(run, "checkpoints", "latest")) as f:
        assert f.read().strip() == "epoch-00001"            # epochs 0 and 1 done, checkpoint intact
    srv = subprocess.Popen(server, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert "reward-server" in srv.stdout.readline()
        r = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        srv.terminate()
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert [json.loads(x)["epoch"] for x in f] == [0, 1, 2, 3]
