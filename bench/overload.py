"""Overload and shutdown under load, on `pgw serve --demo` in its own process (not a test: a measurement).

    python -m bench.overload [--out bench/results/DATE-overload] [--seconds 30] [--factor 10]

1. Capacity: closed loop, 32 callers, for 10 s, of a mix of Translate (4 texts, beam 4, 48 new tokens) and
   Embed (16-32 texts of 4 sentences): requests heavy enough that the load generator, on the same cores,
   needs little of them.
2. Normal latency: open loop (Poisson) at half the capacity.
3. Overload: open loop at `factor` x capacity for `seconds`, every request with a 2 s deadline. Each reply is
   checked against its request (Translate echoes its request_id, Embed answers one vector per text).
4. Recovery: half the capacity again at once; latency per second after the overload ended.
5. SIGTERM at 3x capacity: a fresh server (drain 2 s, grace 10 s) gets SIGTERM 3 s into an open-loop run.
Every status code seen is counted; the server's own count by code comes from its /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.gateway import free_port
from bench.load import LoadResult, closed_loop, open_loop
from bench.results import measurement_parser, write_measurement
from gateway.config import cache_dir
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc as pb_grpc
from gateway.samples import sample_sentences

DEADLINE_S = 2.0


def summary(name: str, result: LoadResult, traffic: Traffic) -> dict[str, Any]:
    ok = [s.latency * 1000 for s in result.samples if s.code == "OK"]
    refused = [s for s in result.samples if s.code == "RESOURCE_EXHAUSTED"]
    return {
        "run": name,
        "offered_per_s": round(result.level, 1) if result.mode == "open" else 0,
        "seconds": round(result.seconds, 1),
        "requests": len(result.samples),
        "codes": dict(Counter(s.code for s in result.samples)),
        "ok_per_s": round(len(ok) / result.seconds, 1),
        "mismatched": len(traffic.mismatched),
        "refusals_with_message": sum(bool(s.details) for s in refused),
        "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok else None,
        "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok else None,
    }


class Traffic:
    """The request mix, and the check of each reply against its request (`mismatched`: their indices)."""

    def __init__(self, stub: pb_grpc.PolyglotStub) -> None:
        self.stub = stub
        self.sentences = [s.text for s in sample_sentences()]
        self.mismatched: set[int] = set()

    async def call(self, index: int) -> tuple[int, int]:
        """Send request `index`: a load.Call, returning (texts, tokens)."""
        rng = random.Random(index)
        if index % 2 == 0:
            request_id = f"r{index}"
            texts = rng.sample(self.sentences, 4)
            reply = await self.stub.Translate(
                pb.TranslateRequest(
                    texts=texts,
                    source_lang="eng_Latn",
                    target_lang="fra_Latn",
                    options=pb.TranslateOptions(max_new_tokens=48, beam_size=4),
                    request_id=request_id,
                ),
                timeout=DEADLINE_S,
            )
            if reply.request_id != request_id or len(reply.translations) != len(texts):
                self.mismatched.add(index)
        else:
            texts = [" ".join(rng.sample(self.sentences, 4)) for _ in range(rng.randint(16, 32))]
            reply = await self.stub.Embed(pb.EmbedRequest(texts=texts), timeout=DEADLINE_S)
            if len(reply.embeddings) != len(texts):
                self.mismatched.add(index)
        return len(texts), reply.usage.input_tokens


class Server:
    def __init__(self, demo_dir: Path, drain: float, cpus: str = "") -> None:
        self.port, self.metrics_port = free_port(), free_port()
        env = os.environ | {"PGW_DEMO_DIR": str(demo_dir), "PGW_DRAIN_SECONDS": str(drain)}
        command = [
            sys.executable, "-m", "gateway", "serve", "--demo", "--host", "127.0.0.1",
            "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--log-level", "WARNING",
        ]  # fmt: skip
        if cpus:  # the server on its own cores, the load generator on the others
            command = ["taskset", "-c", cpus, *command]
            env["PGW_INTRA_OP_THREADS"] = str(len(cpus.split(",")))
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(self.log())
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.2)

    def counts(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        counts: dict[str, float] = {}
        for line in body.splitlines():
            if line.startswith("pgw_requests_total{"):
                code = line.split('code="', 1)[1].split('"', 1)[0]
                counts[code] = counts.get(code, 0.0) + float(line.rsplit(" ", 1)[1])
        return counts

    def log(self) -> str:
        return self.process.stdout.read().decode() if self.process.stdout else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)


def split_cpus(server_cpus: str) -> str:
    """Pin the server to `server_cpus` and this load generator to the other CPUs, so that the generator's
    own work does not slow the server it measures (on 2 cores: one each)."""
    if not server_cpus:
        return ""
    mine = sorted(os.sched_getaffinity(0) - {int(c) for c in server_cpus.split(",")})
    if mine:
        os.sched_setaffinity(0, mine)
    return server_cpus


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    cpus = split_cpus(args.server_cpus)
    report: dict[str, Any] = {"deadline_s": DEADLINE_S, "cpus": os.cpu_count(), "server_cpus": cpus}
    server = Server(args.demo_dir, drain=0, cpus=cpus)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            traffic = Traffic(pb_grpc.PolyglotStub(channel))
            await closed_loop(traffic.call, 8, seconds=3)  # warm-up
            report["capacity"] = summary(
                "closed loop x32", await closed_loop(traffic.call, 32, seconds=10), traffic
            )
            capacity = report["capacity"]["ok_per_s"]
            normal = await open_loop(traffic.call, capacity / 2, 8, seed=1)
            report["normal"] = summary("normal", normal, traffic)
            before = server.counts()
            overload = await open_loop(traffic.call, capacity * args.factor, args.seconds, seed=2)
            after = server.counts()
            report["overload"] = summary("overload", overload, traffic)
            report["overload_server_codes"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            recovery = await open_loop(traffic.call, capacity / 2, 6, seed=3)
            report["recovery"] = summary("recovery", recovery, traffic)
            report["recovery_p50_ms_by_second"] = p50_by_second(recovery, 6)
    finally:
        server.stop()
    report["sigterm"] = await sigterm_under_load(args.demo_dir, capacity * 3, cpus)
    return report


async def sigterm_under_load(demo_dir: Path, rate: float, cpus: str) -> dict[str, Any]:
    """SIGTERM 3 s into an 8 s open-loop run at `rate`; drain 2 s, grace 10 s."""
    server = Server(demo_dir, drain=2, cpus=cpus)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        traffic = Traffic(pb_grpc.PolyglotStub(channel))
        await closed_loop(traffic.call, 8, seconds=2)
        loop = asyncio.get_running_loop()
        loop.call_later(3, server.process.send_signal, signal.SIGTERM)
        run = await open_loop(traffic.call, rate, 8, seed=4)
    result = summary("sigterm at 3x", run, traffic)
    result["exit_code"] = server.process.wait(timeout=60)
    result["unavailable_details"] = dict(
        Counter(s.details[:60] for s in run.samples if s.code == "UNAVAILABLE").most_common(4)
    )
    result["cancelled"] = sum(s.code == "CANCELLED" for s in run.samples)
    return result


def p50_by_second(result: LoadResult, seconds: int) -> list[float | None]:
    """The p50 of the requests that began in each second of a run."""
    began = min(s.started for s in result.samples)
    by_second: list[float | None] = []
    for k in range(seconds):
        window = [
            s.latency * 1000 for s in result.samples if s.code == "OK" and k <= s.started - began < k + 1
        ]
        by_second.append(round(float(np.percentile(window, 50)), 1) if window else None)
    return by_second


def markdown(report: dict[str, Any]) -> str:
    rows = [report[k] for k in ("capacity", "normal", "overload", "recovery", "sigterm")]
    lines = [
        "| run | offered/s | requests | OK/s | p50 ms | p99 ms | codes | mismatched |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
        lines.append(
            f"| {r['run']} | {r['offered_per_s']} | {r['requests']} | {r['ok_per_s']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {codes} | {r['mismatched']} |"
        )
    lines.append("")
    lines.append(f"Recovery p50 by second after the overload: {report['recovery_p50_ms_by_second']}")
    lines.append(f"Server's codes during the overload: {report['overload_server_codes']}")
    sigterm = report["sigterm"]
    lines.append(
        f"SIGTERM run: exit code {sigterm['exit_code']}, CANCELLED {sigterm['cancelled']}, "
        f"UNAVAILABLE details {sigterm['unavailable_details']}"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = measurement_parser(__doc__, "overload")
    parser.add_argument("--demo-dir", type=Path, default=cache_dir() / "demo")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--factor", type=float, default=10)
    default_cpus = "0" if len(os.sched_getaffinity(0)) > 1 else ""
    parser.add_argument("--server-cpus", default=default_cpus, help="CPUs for the server ('': no pinning)")
    args = parser.parse_args()
    report = asyncio.run(measure(args))
    write_measurement(args.out, "overload", report, markdown(report))


if __name__ == "__main__":
    main()
