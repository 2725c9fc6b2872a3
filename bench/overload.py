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
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.gateway import free_port
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc as pb_grpc
from gateway.samples import sample_sentences

DEADLINE_S = 2.0


@dataclass
class Outcome:
    started: float  # seconds since the run began
    latency: float
    code: str
    mismatch: bool = False
    details: str = ""


@dataclass
class Run:
    name: str
    rate: float
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [o.latency * 1000 for o in self.outcomes if o.code == "OK"]
        codes = Counter(o.code for o in self.outcomes)
        refused = [o for o in self.outcomes if o.code == "RESOURCE_EXHAUSTED"]
        return {
            "run": self.name,
            "offered_per_s": round(self.rate, 1),
            "seconds": round(self.seconds, 1),
            "requests": len(self.outcomes),
            "codes": dict(codes),
            "ok_per_s": round(len(ok) / self.seconds, 1),
            "mismatched": sum(o.mismatch for o in self.outcomes),
            "refusals_with_message": sum(bool(o.details) for o in refused),
            "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok else None,
            "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok else None,
        }


class Traffic:
    """The request mix, and the check of each reply against its request."""

    def __init__(self, stub: pb_grpc.PolyglotStub) -> None:
        self.stub = stub
        self.sentences = [s.text for s in sample_sentences()]

    async def call(self, index: int) -> bool:
        """Send request `index`; True when its reply does not belong to it."""
        rng = random.Random(index)
        if index % 2 == 0:
            request_id = f"r{index}"
            reply = await self.stub.Translate(
                pb.TranslateRequest(
                    texts=rng.sample(self.sentences, 4),
                    source_lang="eng_Latn",
                    target_lang="fra_Latn",
                    options=pb.TranslateOptions(max_new_tokens=48, beam_size=4),
                    request_id=request_id,
                ),
                timeout=DEADLINE_S,
            )
            return reply.request_id != request_id or len(reply.translations) != 4
        texts = [" ".join(rng.sample(self.sentences, 4)) for _ in range(rng.randint(16, 32))]
        reply = await self.stub.Embed(pb.EmbedRequest(texts=texts), timeout=DEADLINE_S)
        return len(reply.embeddings) != len(texts)


async def _one(traffic: Traffic, index: int, began: float, run: Run) -> None:
    started = time.perf_counter()
    try:
        mismatch = await traffic.call(index)
        run.outcomes.append(Outcome(started - began, time.perf_counter() - started, "OK", mismatch))
    except grpc.aio.AioRpcError as error:
        details = error.details() or ""
        run.outcomes.append(
            Outcome(started - began, time.perf_counter() - started, error.code().name, details=details)
        )


async def open_loop(traffic: Traffic, name: str, rate: float, seconds: float, seed: int = 0) -> Run:
    rng = random.Random(seed)
    run = Run(name, rate, seconds)
    tasks: list[asyncio.Task[None]] = []
    began = time.perf_counter()
    next_at = began
    index = seed * 10_000_000
    while True:
        next_at += rng.expovariate(rate)
        if next_at - began >= seconds:
            break
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(traffic, index, began, run)))
        index += 1
    await asyncio.gather(*tasks)
    return run


async def closed_loop(traffic: Traffic, concurrency: int, seconds: float) -> Run:
    run = Run(f"closed loop x{concurrency}", 0, seconds)
    began = time.perf_counter()
    counter = iter(range(10**9))

    async def caller() -> None:
        while time.perf_counter() - began < seconds:
            await _one(traffic, next(counter), began, run)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - began
    return run


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
            await closed_loop(traffic, 8, 3)  # warm-up
            capacity_run = await closed_loop(traffic, 32, 10)
            capacity = capacity_run.summary()["ok_per_s"]
            report["capacity"] = capacity_run.summary()
            report["normal"] = (await open_loop(traffic, "normal", capacity / 2, 8, seed=1)).summary()
            before = server.counts()
            overload = await open_loop(traffic, "overload", capacity * args.factor, args.seconds, seed=2)
            after = server.counts()
            report["overload"] = overload.summary()
            report["overload_server_codes"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            recovery = await open_loop(traffic, "recovery", capacity / 2, 6, seed=3)
            report["recovery"] = recovery.summary()
            report["recovery_p50_ms_by_second"] = [
                round(float(np.percentile(s, 50)), 1) if (s := [
                    o.latency * 1000 for o in recovery.outcomes if o.code == "OK" and k <= o.started < k + 1
                ]) else None
                for k in range(6)
            ]  # fmt: skip
    finally:
        server.stop()
    report["sigterm"] = await sigterm_under_load(args.demo_dir, capacity * 3, cpus)
    return report


async def sigterm_under_load(demo_dir: Path, rate: float, cpus: str) -> dict[str, Any]:
    """SIGTERM 3 s into an 8 s open-loop run at `rate`; drain 2 s, grace 10 s."""
    server = Server(demo_dir, drain=2, cpus=cpus)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        traffic = Traffic(pb_grpc.PolyglotStub(channel))
        await closed_loop(traffic, 8, 2)
        loop = asyncio.get_running_loop()
        loop.call_later(3, server.process.send_signal, signal.SIGTERM)
        run = await open_loop(traffic, "sigterm at 3x", rate, 8, seed=4)
    exit_code = server.process.wait(timeout=60)
    summary = run.summary()
    summary["exit_code"] = exit_code
    summary["unavailable_details"] = dict(
        Counter(o.details[:60] for o in run.outcomes if o.code == "UNAVAILABLE").most_common(4)
    )
    summary["cancelled"] = sum(o.code == "CANCELLED" for o in run.outcomes)
    return summary


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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results") / f"{time.strftime('%Y-%m-%d')}-overload"
    )
    parser.add_argument("--demo-dir", type=Path, default=Path("~/.cache/polyglot-gateway/demo").expanduser())
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--factor", type=float, default=10)
    default_cpus = "0" if len(os.sched_getaffinity(0)) > 1 else ""
    parser.add_argument("--server-cpus", default=default_cpus, help="CPUs for the server ('': no pinning)")
    args = parser.parse_args()
    report = asyncio.run(measure(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "overload.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
