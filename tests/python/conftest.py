"""Starts the real backstop binary with the real test models for the client-library tests."""

import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest


def _cache() -> pathlib.Path:
    return pathlib.Path(os.environ.get("BACKSTOP_CACHE", pathlib.Path.home() / ".cache" / "backstop"))


def binary() -> str:
    if "BACKSTOP_BIN" in os.environ:
        return os.environ["BACKSTOP_BIN"]
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", _cache() / "target"))
    return str(target / "release" / "backstop")


def model(file: str) -> pathlib.Path:
    models = pathlib.Path(os.environ.get("BACKSTOP_MODELS", _cache() / "models"))
    path = models / file
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/setup.sh test")
    return path


def fake_hub_binary() -> str:
    """The test suite's fake Hugging Face hub (examples/fake_hub.rs), built by `cargo test`."""
    path = pathlib.Path(binary()).parent / "examples" / "fake_hub"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo test --release` (it builds the examples) first")
    return str(path)


class FakeHub:
    """A stand-in for huggingface.co on loopback, serving the given local files."""

    def __init__(self, files):
        args = [f"{repo}={name}={path}" for repo, name, path in files]
        self.proc = subprocess.Popen([fake_hub_binary(), *args], stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.stop()
            pytest.fail("the fake hub did not start")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma-3-270m-q4_k_m.gguf"


class Backstop:
    """One `backstop serve` process on a free loopback port, with its own model store."""

    def __init__(self, args, env=None):
        self.store = tempfile.mkdtemp(prefix="backstop-py-store-")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
        self.proc = subprocess.Popen(
            [binary(), "serve", "--host", "127.0.0.1:0", "--threads", "1", "--models-dir", self.store, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**clean, **(env or {})},
        )
        found: dict = {}
        ready = threading.Event()
        self.log: list[str] = []

        def read_log():
            for line in self.proc.stderr:
                self.log.append(line)
                if "listening on http://" in line and "url" not in found:
                    found["url"] = "http://" + line.split("listening on http://", 1)[1].strip()
                    ready.set()

        threading.Thread(target=read_log, daemon=True).start()
        if not ready.wait(30):
            self.stop()
            pytest.fail("backstop did not start: " + "".join(self.log))
        self.url = found["url"]
        self.host = self.url.removeprefix("http://")
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health/ready") as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if time.time() > deadline:
                self.stop()
                pytest.fail("backstop never became ready: " + "".join(self.log))
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.store, ignore_errors=True)


@pytest.fixture(scope="session")
def base_url():
    server = Backstop(["--model", f"smollm2={model(SMOLLM2)}"])
    yield server.url
    server.stop()
