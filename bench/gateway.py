"""The gateway under test: `pgw serve` in its own process (as deployed), and its /metrics, scraped before and
after a run for the server's own split of time between queue and inference."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    """`pgw serve` on loopback for one model: started, waited for, stopped with SIGTERM."""

    def __init__(
        self,
        name: str,
        export_dir: Path,
        variant: str,
        work: Path,
        batching: dict[str, Any] | None = None,
        triton: str | None = None,  # a Triton gRPC endpoint: serve the model from there
        device: str = "cpu",
        extra_models: list[dict[str, Any]] | None = None,  # more models in the same process
        server: dict[str, Any] | None = None,  # more server settings (intra_op_threads, ...)
        label: str | None = None,  # names its config and log files; default name-variant
        model: dict[str, Any] | None = None,  # more settings of the measured model (spinning, ...)
    ) -> None:
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        config: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "metrics_host": "127.0.0.1",
            "metrics_port": self.metrics_port,
            "http_port": 0,  # measured over gRPC (a `server` setting may ask for HTTP)
            "device": device,
            "models": [{"name": name, "path": str(export_dir), "variant": variant, **(model or {})}],
        }
        config["models"] += extra_models or []
        config.update(server or {})
        if triton:
            config["models"][0]["backend"] = "triton"
            config["triton"] = {"endpoints": [triton]}
        if batching:
            config["batching"] = batching
        work.mkdir(parents=True, exist_ok=True)
        label = label or f"{name}-{variant}{'-triton' if triton else ''}"
        self.config_file = work / f"gateway-{label}.yaml"
        self.config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_file = work / f"gateway-{label}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> None:
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(self.config_file),
                    "--log-level",
                    "WARNING",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the gateway exited: {self.log_file.read_text()[-2000:]}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"the gateway was not serving after {timeout} s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None

    def scrape(self) -> dict[str, float]:
        """Sums and counts of the server's queue and inference histograms for this model."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        values: dict[str, float] = {}
        for metric in ("pgw_queue_duration_seconds", "pgw_inference_duration_seconds", "pgw_batch_size"):
            for kind in ("sum", "count"):
                pattern = rf'^{metric}_{kind}{{[^}}]*model="{re.escape(self.name)}"[^}}]*}} (\S+)$'
                values[f"{metric}_{kind}"] = sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))
        return values


def server_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """During a run, from two scrapes: mean queue wait per item, mean batch run time, mean batch size."""
    split = {}
    for metric, label in (
        ("pgw_queue_duration_seconds", "queue"),
        ("pgw_inference_duration_seconds", "inference"),
    ):
        count = after[f"{metric}_count"] - before[f"{metric}_count"]
        total = after[f"{metric}_sum"] - before[f"{metric}_sum"]
        split[f"server_{label}_ms"] = 1000 * total / count if count else 0.0
    batches = after["pgw_batch_size_count"] - before["pgw_batch_size_count"]
    items = after["pgw_batch_size_sum"] - before["pgw_batch_size_sum"]
    split["server_batch_size"] = items / batches if batches else 0.0
    return split
