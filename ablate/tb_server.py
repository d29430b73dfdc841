"""Start the real TensorBoard server on a run or sweep folder, bound to 127.0.0.1 only."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ablate.config import ConfigError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(logdir: str | Path, port: int = 0, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Launch TensorBoard on 127.0.0.1; returns (process, url) once it answers HTTP."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise ConfigError([("logdir", f"{logdir} is not a folder")])
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--reload_interval",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"TensorBoard exited with code {proc.returncode}: {err[-2000:]}")
        try:
            with urllib.request.urlopen(url + "data/runs", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"TensorBoard did not answer on {url} within {timeout:.0f}s")


def serve(logdir: str | Path, port: int = 0) -> None:
    """Run TensorBoard in the foreground until Ctrl-C."""
    proc, url = start(logdir, port)
    print(f"TensorBoard on {url} (serving {logdir}); Ctrl-C to stop", flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proc.terminate()
        proc.wait(timeout=10)
