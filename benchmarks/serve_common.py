"""What the server benchmarks share: `edgekv serve` started on a free loopback port and stopped with SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

EDGEKV = str(Path(sys.executable).parent / "edgekv")
START_TIMEOUT_S = 300


@dataclass
class RunningServer:
    url: str
    pid: int

    def peak_rss_mib(self) -> float:
        """The server process's peak resident memory so far (VmHWM)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


@contextmanager
def running_server(artifact: Path, *args: str):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([EDGEKV, "serve", str(artifact), "--port", str(port), *args])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise SystemExit(f"edgekv serve exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("edgekv serve did not come up")
            time.sleep(0.5)
        yield RunningServer(url, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(120)
        print(f"edgekv serve stopped by SIGTERM, exit code {code}", flush=True)
