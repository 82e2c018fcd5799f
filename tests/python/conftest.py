"""Starts the real backstop binary with the real SmolLM2 model for the client-library tests."""

import os
import pathlib
import subprocess
import threading
import time
import urllib.request

import pytest


def _cache() -> pathlib.Path:
    return pathlib.Path(os.environ.get("BACKSTOP_CACHE", pathlib.Path.home() / ".cache" / "backstop"))


def _binary() -> str:
    if "BACKSTOP_BIN" in os.environ:
        return os.environ["BACKSTOP_BIN"]
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", _cache() / "target"))
    return str(target / "release" / "backstop")


def _model() -> pathlib.Path:
    models = pathlib.Path(os.environ.get("BACKSTOP_MODELS", _cache() / "models"))
    path = models / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/setup.sh test")
    return path


@pytest.fixture(scope="session")
def base_url():
    proc = subprocess.Popen(
        [_binary(), "serve", "--host", "127.0.0.1:0", "--threads", "1", "--model", f"smollm2={_model()}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found: dict = {}
    ready = threading.Event()

    def read_log():
        for line in proc.stderr:
            if "listening on http://" in line and "url" not in found:
                found["url"] = "http://" + line.split("listening on http://", 1)[1].strip()
                ready.set()

    threading.Thread(target=read_log, daemon=True).start()
    if not ready.wait(30):
        proc.kill()
        pytest.fail("backstop did not start")
    url = found["url"]
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health") as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("backstop never became ready")
        time.sleep(0.05)
    yield url
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
