"""A real IPFS daemon for tests: js-ipfs 0.66.1 from tests/fixtures/jsipfs.

No Kubo binary can be installed on these machines; js-ipfs speaks the same
`/api/v0` and builds the same UnixFS DAGs (tests/fixtures/jsipfs/README.md lists where it
differs). `scripts/install-jsipfs.sh` installs it (`make test` and `.ci/run`
run it first); without it the tests that need a daemon are skipped with that hint.

Each daemon gets a fresh repo in a temp dir and a free loopback API port, runs
offline with preload off (otherwise every add contacts public preload nodes),
and is stopped with SIGTERM (then SIGKILL) when the test module ends. With
`online=True` it also runs libp2p, as a peer on the wire for meshrun nodes:
listening on 127.0.0.1 only, with no bootstrap list, no mDNS and no routing
(init-config.json), so it talks to no one but the peers a test connects it to.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "jsipfs"
CLI = FIXTURE / "node_modules" / "ipfs" / "src" / "cli.js"
INSTALL_HINT = "run scripts/install-jsipfs.sh (make test does) to install the test IPFS daemon"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available() -> bool:
    return CLI.is_file() and shutil.which("node") is not None


class JsIpfsDaemon:
    def __init__(self, workdir: Path, port: int | None = None, *, online: bool = False) -> None:
        self.workdir = workdir
        self.online = online
        self.port = port or free_port()
        self.api = f"/ip4/127.0.0.1/tcp/{self.port}"
        self.url = f"http://127.0.0.1:{self.port}/api/v0"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "daemon.log"

    def start(self) -> JsIpfsDaemon:
        """Launch without waiting (see `wait_ready`), so callers can overlap other setup."""
        if not available():
            pytest.skip(INSTALL_HINT)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = json.loads((FIXTURE / "init-config.json").read_text())
        config["Addresses"]["API"] = self.api
        (self.workdir / "init-config.json").write_text(json.dumps(config))
        env = {**os.environ, "IPFS_PATH": str(self.workdir / "repo")}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    "node",
                    str(CLI),
                    "daemon",
                    "--init-profile",
                    "test",
                    "--init-config",
                    str(self.workdir / "init-config.json"),
                    *([] if self.online else ["--offline"]),
                    "--enable-preload=false",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> JsIpfsDaemon:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"js-ipfs exited early:\n{self.log.read_text()[-2000:]}")
            if "Daemon is ready" in self.log.read_text(errors="replace"):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"js-ipfs not ready after {timeout}s:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class SwitchableLink:
    """A loopback TCP forwarder in front of the daemon that can be cut and restored.

    It stands for the network path to a user's daemon: cutting it makes the
    daemon unreachable (connection refused) exactly as a stopped daemon would,
    without paying for a daemon restart in every test that needs an outage.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.api = f"/ip4/127.0.0.1/tcp/{self.port}"
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
