"""A local tritonserver: find it, prepare its backends, start it, wait until it is ready, stop it.

Two installs are understood:
- the `nvidia-pytriton` wheel (`pip install --no-deps nvidia-pytriton`), which bundles tritonserver 2.51 with
  the Python backend and one Python stub per Python version. Its backends are copied into a state directory
  with the stub for the running Python put beside `libtriton_python.so`; `LD_LIBRARY_PATH` points at the
  wheel's libraries and this Python's `bin` comes first on `PATH`, which is how the stub finds the packages
  (this one included) that the Python models import;
- a `tritonserver` on `PATH` with its backends in `/opt/tritonserver/backends` (NVIDIA's container).

`pgw triton up` starts one in the background and records it in the state directory; `pgw triton down`
stops it. Tests use `TritonServer` directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

from gateway.errors import GatewayError, InvalidInput

STATE_FILE = "tritonserver.json"
LOG_FILE = "tritonserver.log"
SYSTEM_BACKENDS = Path("/opt/tritonserver/backends")


class TritonServerError(GatewayError):
    """tritonserver is missing, did not start, or is not ours to stop."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path  # the backend directory as installed
    python_stubs: Path | None  # pytriton: python_backend_stubs/<major.minor>/triton_python_backend_stub
    libraries: Path | None  # pytriton: the wheel's bundled shared libraries


@dataclass(frozen=True)
class Ports:
    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002


def locate(binary: Path | None = None) -> TritonInstall:
    """The tritonserver to run: `binary` if given, else the nvidia-pytriton wheel's, else one on PATH."""
    if binary is None:
        spec = find_spec("pytriton")
        if spec is not None and spec.origin is not None:
            root = Path(spec.origin).parent / "tritonserver"
            libraries = Path(spec.origin).parent.parent / "nvidia_pytriton.libs"
            if (root / "bin" / "tritonserver").is_file():
                return TritonInstall(
                    binary=root / "bin" / "tritonserver",
                    backends=root / "backends",
                    python_stubs=root / "python_backend_stubs",
                    libraries=libraries if libraries.is_dir() else None,
                )
        found = shutil.which("tritonserver")
        if found is None:
            raise TritonServerError(
                "no tritonserver found: pip install --no-deps nvidia-pytriton (bundles tritonserver 2.51 "
                "with the Python backend), or put NVIDIA's tritonserver on PATH"
            )
        binary = Path(found)
    if not binary.is_file():
        raise TritonServerError(f"{binary} is not a file")
    backends = binary.parent.parent / "backends"
    return TritonInstall(binary, backends if backends.is_dir() else SYSTEM_BACKENDS, None, None)


class TritonServer:
    """One tritonserver process serving `repository` on `ports`; its backends and log live in `state_dir`."""

    def __init__(
        self,
        repository: Path,
        state_dir: Path,
        ports: Ports = Ports(),
        install: TritonInstall | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if not repository.is_dir():
            raise InvalidInput(f"model repository {repository} is not a directory")
        self.repository = repository.resolve()
        self.state_dir = state_dir
        self.ports = ports
        self.install = install or locate()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILE

    def backend_directory(self) -> Path:
        """The backends to load: pytriton's, copied with the stub for this Python; else as installed."""
        if self.install.python_stubs is None:
            return self.install.backends
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.install.python_stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonServerError(f"this tritonserver has no Python backend stub for Python {version}")
        target = self.state_dir / "backends"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(self.install.backends, target)
        shutil.copy2(stub, target / "python" / "triton_python_backend_stub")
        return target

    def command(self, backends: Path) -> list[str]:
        return [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--grpc-port={self.ports.grpc}",
            f"--http-port={self.ports.http}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=10",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if self.install.libraries is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(self.install.libraries), env.get("LD_LIBRARY_PATH", "")) if p
            )
        return env

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        backends = self.backend_directory()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(backends),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # outlives `pgw triton up`; Ctrl-C in its terminal does not reach it
            )

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.ports.http}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            if self.process is not None and self.process.poll() is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (Triton finishes in-flight requests), then SIGKILL after `timeout`."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        except ProcessLookupError:
            pass
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no graceful shutdown."""
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def save_state(self) -> Path:
        assert self.process is not None
        state = {
            "pid": self.process.pid,
            "repository": str(self.repository),
            "log": str(self.log_path),
            "ports": asdict(self.ports),
        }
        path = self.state_dir / STATE_FILE
        path.write_text(json.dumps(state, indent=2), encoding="utf-8")
        return path


def _alive(pid: int) -> bool:
    try:  # reap it if it is our child (a zombie still answers kill(pid, 0))
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _terminate(pid: int, timeout: float) -> None:
    """Stop the process group led by `pid` (tritonserver and its Python stubs), not a child of ours."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def read_state(state_dir: Path) -> dict[str, object] | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    state: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return state


def stop_recorded(state_dir: Path, timeout: float = 20.0) -> int | None:
    """Stop the tritonserver `pgw triton up` recorded in `state_dir`; its pid, or None if none ran."""
    state = read_state(state_dir)
    if state is None:
        return None
    pid = int(str(state["pid"]))
    if _alive(pid):
        _terminate(pid, timeout)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return pid
