"""Continuous against static scheduling of translation, side by side in one run, and head-of-line blocking
of an encoder by translations in the same server (a measurement, not a test).

    python -m bench.scheduling --translation EXPORT_DIR [--embedding EXPORT_DIR] [--variant int8]

1. `static` and `continuous`, each on its own `pgw serve` of the translation model, started together and
   loaded in turn (each load point in two rounds, alternating which goes first): closed loops at each
   concurrency of mixed single-sentence requests (8-60 tokens, as many new tokens as the source has, so
   rows end at different steps), then Poisson arrivals at 0.8 of each one's best closed-loop rate. From
   the servers' metrics: the mean wait for the engine to take a text, also in decoder steps (wait / mean
   step time), the encoder time of those that joined, rows and time a step.
2. Head-of-line: one-text Embed requests (closed loop, one caller) while two callers send 8-text beam-8
   translations, with both models in one server and with the translations on another server, in
   alternating rounds.
Writes scheduling.json, scheduling.md and scheduling.png to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import urllib.request
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.gateway import GatewayProcess
from bench.load import LoadResult, Sample, closed_loop, open_loop
from bench.results import measurement_parser, write_measurement
from bench.texts import TextMaker
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc as pb_grpc

NLLB, EMBED = "nllb", "embed"


def sentences(maker: TextMaker, count: int, seed: int = 0) -> list[tuple[str, int]]:
    """(text, tokens) of `count` single sentences of 8 to 60 tokens, in the bench languages in turn."""
    rng = random.Random(seed)
    made = []
    for index in range(count):
        tokens = rng.randint(8, 60)
        text = maker.text(tokens, offset=index)
        made.append((text.text, text.tokens))
    return made


def translate_call(stub: pb_grpc.PolyglotStub, texts: list[tuple[str, int]]) -> Any:
    async def call(index: int) -> tuple[int, int]:
        text, tokens = texts[index % len(texts)]
        request = pb.TranslateRequest(
            texts=[text],
            source_lang="eng_Latn",
            target_lang="fra_Latn",
            model=NLLB,
            options=pb.TranslateOptions(max_new_tokens=tokens),
        )
        reply = await stub.Translate(request, timeout=600)
        return 1, int(reply.usage.output_tokens)

    return call


METRICS = (
    "pgw_queue_duration_seconds",
    "pgw_engine_step_duration_seconds",
    "pgw_engine_encode_duration_seconds",
    "pgw_batch_size",
)


def scrape(gateway: GatewayProcess) -> dict[str, float]:
    """Sums and counts of the engine's join wait, step time, encoder time and rows a step."""
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values: dict[str, float] = {}
    for metric in METRICS:
        for kind in ("sum", "count"):
            total = 0.0
            for line in text.splitlines():
                if line.startswith(f"{metric}_{kind}{{") and f'model="{NLLB}"' in line:
                    total += float(line.rsplit(" ", 1)[1])
            values[f"{metric}_{kind}"] = total
    return values


def engine_split(delta: dict[str, float]) -> dict[str, float]:
    """Means over a run from the difference of two scrapes (summed over rounds)."""

    def mean(metric: str) -> float:
        count = delta[f"{metric}_count"]
        return delta[f"{metric}_sum"] / count if count else 0.0

    wait, step = mean("pgw_queue_duration_seconds"), mean("pgw_engine_step_duration_seconds")
    return {
        "join_wait_ms": 1000 * wait,
        "step_ms": 1000 * step,
        "encode_ms": 1000 * mean("pgw_engine_encode_duration_seconds"),
        "join_wait_steps": wait / step if step else 0.0,
        "rows_per_step": mean("pgw_batch_size"),
    }


def row(scheduling: str, result: LoadResult, split: dict[str, float] | None = None) -> dict[str, Any]:
    summary = result.summary()
    return {
        "scheduling": scheduling,
        "mode": result.mode,
        "level": result.level,
        "requests_per_s": summary["requests_per_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "errors": summary["errors"],
        **(split or {}),
    }


class Side:
    """One scheduling's server, and what its rounds at one load point added up to."""

    def __init__(self, scheduling: str, args: argparse.Namespace) -> None:
        batching = {"scheduling": scheduling, "max_batch_size": args.max_batch_size, "max_queue_delay_ms": 5}
        self.scheduling = scheduling
        self.gateway = GatewayProcess(
            NLLB, args.translation, args.variant, args.out / "logs" / scheduling, batching=batching
        )
        self.reset()

    def reset(self) -> None:
        self.samples: list[Sample] = []
        self.seconds = 0.0
        self.delta = dict.fromkeys((f"{m}_{k}" for m in METRICS for k in ("sum", "count")), 0.0)

    async def run(self, load: Awaitable[LoadResult]) -> LoadResult:
        before = scrape(self.gateway)
        result = await load
        after = scrape(self.gateway)
        for key in self.delta:
            self.delta[key] += after[key] - before[key]
        self.samples += result.samples
        self.seconds += result.seconds
        return result

    def row(self, mode: str, level: float) -> dict[str, Any]:
        pooled = row(
            self.scheduling, LoadResult(mode, level, self.seconds, self.samples), engine_split(self.delta)
        )
        self.reset()
        return pooled


def closed_at(calls: dict[str, Any], concurrency: int, seconds: float, scheduling: str, turn: int) -> Any:
    return closed_loop(calls[scheduling], concurrency, seconds=seconds)


def poisson_at(
    calls: dict[str, Any], best: dict[str, float], seconds: float, scheduling: str, turn: int
) -> Any:
    """Poisson arrivals at 0.8 of the scheduling's best closed-loop rate; another seed every round."""
    return open_loop(calls[scheduling], 0.8 * best[scheduling], seconds, seed=1 + turn)


async def scheduling_runs(
    args: argparse.Namespace, texts: list[tuple[str, int]], rounds: int = 2
) -> list[dict[str, Any]]:
    """Both schedulings, each on its own server, started together; every load point runs in `rounds`
    rounds that alternate which goes first, so that drift in the machine's speed falls on both alike."""
    sides = [Side("static", args), Side("continuous", args)]
    rows: list[dict[str, Any]] = []
    for side in sides:
        side.gateway.start()
    try:
        async with (
            grpc.aio.insecure_channel(sides[0].gateway.address) as first,
            grpc.aio.insecure_channel(sides[1].gateway.address) as second,
        ):
            calls = {
                side.scheduling: translate_call(pb_grpc.PolyglotStub(channel), texts)
                for side, channel in zip(sides, (first, second), strict=True)
            }
            for side in sides:
                await closed_loop(calls[side.scheduling], 4, requests=8)  # warm-up

            async def alternate(make: Callable[[str, int], Awaitable[LoadResult]]) -> None:
                for turn in range(rounds):
                    for side in sides if turn % 2 == 0 else sides[::-1]:
                        await side.run(make(side.scheduling, turn))

            seconds = args.seconds / rounds
            for concurrency in args.concurrency:
                await alternate(partial(closed_at, calls, concurrency, seconds))
                rows += [side.row("closed", concurrency) for side in sides]
            best = {
                side.scheduling: max(r["requests_per_s"] for r in rows if r["scheduling"] == side.scheduling)
                for side in sides
            }
            await alternate(partial(poisson_at, calls, best, seconds))
            rows += [side.row("open", 0.8 * best[side.scheduling]) for side in sides]
    finally:
        for side in sides:
            side.gateway.stop()
    return rows


async def _embed_while_translating(
    embed_address: str, translate_address: str, maker: TextMaker, seconds: float
) -> list[float]:
    """Embed latencies in ms (one caller) while two callers keep 8-text beam-8 translations in flight."""
    texts = [t.text for t in maker.texts(8, 24, lang="eng_Latn")]
    async with (
        grpc.aio.insecure_channel(embed_address) as embed_channel,
        grpc.aio.insecure_channel(translate_address) as translate_channel,
    ):
        embed = pb_grpc.PolyglotStub(embed_channel)
        translate = pb_grpc.PolyglotStub(translate_channel)
        stop = time.monotonic() + seconds

        async def translations() -> None:
            request = pb.TranslateRequest(
                texts=texts,
                source_lang="eng_Latn",
                target_lang="fra_Latn",
                model=NLLB,
                options=pb.TranslateOptions(beam_size=8, max_new_tokens=24),
            )
            while time.monotonic() < stop:
                await translate.Translate(request, timeout=600)

        async def embeds() -> list[float]:
            latencies = []
            while time.monotonic() < stop:
                started = time.perf_counter()
                await embed.Embed(pb.EmbedRequest(texts=["a short text to embed"], model=EMBED), timeout=60)
                latencies.append(1000 * (time.perf_counter() - started))
            return latencies

        tasks = [asyncio.ensure_future(translations()) for _ in range(2)]
        latencies = await embeds()
        await asyncio.gather(*tasks)
    return latencies


def _percentiles(latencies: list[float]) -> dict[str, float]:
    return {
        "embed_p50_ms": float(np.percentile(latencies, 50)),
        "embed_p99_ms": float(np.percentile(latencies, 99)),
        "embeds": float(len(latencies)),
    }


async def head_of_line(args: argparse.Namespace, maker: TextMaker, rounds: int = 4) -> dict[str, Any]:
    """Same server against separate servers, in alternating rounds so that drift in the machine's load
    falls on both alike; each side's latencies are pooled over its rounds."""
    embed_model = {"name": EMBED, "path": str(args.embedding), "variant": args.variant}
    together = GatewayProcess(
        NLLB, args.translation, args.variant, args.out / "logs", extra_models=[embed_model]
    )
    translator = GatewayProcess(NLLB, args.translation, args.variant, args.out / "logs" / "apart")
    embedder = GatewayProcess(EMBED, args.embedding, args.variant, args.out / "logs" / "apart")
    processes = (together, translator, embedder)
    same: list[float] = []
    apart: list[float] = []
    try:
        for process in processes:
            process.start()
        for _ in range(rounds):
            seconds = args.seconds / rounds
            same += await _embed_while_translating(together.address, together.address, maker, seconds)
            apart += await _embed_while_translating(embedder.address, translator.address, maker, seconds)
    finally:
        for process in processes:
            process.stop()
    same_server, separate_servers = _percentiles(same), _percentiles(apart)
    return {
        "rounds": rounds,
        "same_server": same_server,
        "separate_servers": separate_servers,
        "p99_ratio": same_server["embed_p99_ms"] / separate_servers["embed_p99_ms"],
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| scheduling | load | requests/s | tokens/s | p50 ms | p99 ms | join wait ms | steps | encode ms "
        "| rows/step | step ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        load = f"closed x{r['level']}" if r["mode"] == "closed" else f"Poisson {r['level']:.2f}/s"
        lines.append(
            f"| {r['scheduling']} | {load} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r.get('join_wait_ms', 0):.0f} | "
            f"{r.get('join_wait_steps', 0):.2f} | {r.get('encode_ms', 0):.1f} | "
            f"{r.get('rows_per_step', 0):.1f} | {r.get('step_ms', 0):.1f} |"
        )
    lines.append("")
    for key, value in report["comparison"].items():
        lines.append(f"- {key}: {value}")
    hol = report.get("head_of_line")
    if hol:
        lines.append(
            f"- head-of-line: Embed p99 {hol['same_server']['embed_p99_ms']:.1f} ms with beam translations "
            f"in the same server, {hol['separate_servers']['embed_p99_ms']:.1f} ms with them elsewhere "
            f"({hol['p99_ratio']:.2f}x); p50 {hol['same_server']['embed_p50_ms']:.1f} vs "
            f"{hol['separate_servers']['embed_p50_ms']:.1f} ms"
        )
    return "\n".join(lines) + "\n"


def step_cost(rows: list[dict[str, Any]], scheduling: str) -> tuple[float, float]:
    """Least squares of step ms = a + b * rows per step over one scheduling's closed-loop rows."""
    points = [r for r in rows if r["scheduling"] == scheduling and r["mode"] == "closed"]
    b, a = np.polyfit([r["rows_per_step"] for r in points], [r["step_ms"] for r in points], 1)
    return float(a), float(b)


def compare(rows: list[dict[str, Any]], at: int = 8) -> dict[str, str]:
    """The issue's figures: at concurrency `at` (and at the highest), at concurrency 1, under Poisson
    arrivals; and the step cost, which bounds what filling the batch can gain."""

    def closed(scheduling: str, level: int) -> dict[str, Any]:
        return next(
            r for r in rows if r["scheduling"] == scheduling and r["mode"] == "closed" and r["level"] == level
        )

    levels = sorted({r["level"] for r in rows if r["mode"] == "closed"})
    poisson = next(r for r in rows if r["scheduling"] == "continuous" and r["mode"] == "open")
    one_static, one_continuous = closed("static", 1), closed("continuous", 1)
    out: dict[str, str] = {}
    for level in dict.fromkeys(level for level in (at, levels[-1]) if level in levels):
        static, continuous = closed("static", level), closed("continuous", level)
        out[f"throughput at concurrency {level}, continuous / static"] = (
            f"{continuous['requests_per_s'] / static['requests_per_s']:.2f}x "
            f"({continuous['requests_per_s']:.2f} vs {static['requests_per_s']:.2f} req/s; "
            f"{continuous['rows_per_step']:.1f} vs {static['rows_per_step']:.1f} rows a step)"
        )
        out[f"mean join wait at concurrency {level}"] = (
            f"continuous {continuous['join_wait_steps']:.2f} decoder steps, static "
            f"{static['join_wait_steps']:.2f}"
        )
    out["p50 at concurrency 1, continuous / static"] = (
        f"{one_continuous['p50_ms'] / one_static['p50_ms']:.3f} ({one_continuous['p50_ms']:.0f} vs "
        f"{one_static['p50_ms']:.0f} ms)"
    )
    out["Poisson at 0.8 of the best rate, p50 / concurrency-1 p50 (continuous)"] = (
        f"{poisson['p50_ms'] / one_continuous['p50_ms']:.2f}x ({poisson['p50_ms']:.0f} vs "
        f"{one_continuous['p50_ms']:.0f} ms)"
    )
    for scheduling in ("static", "continuous"):
        a, b = step_cost(rows, scheduling)
        out[f"step cost ({scheduling}, closed loops)"] = f"{a:.1f} ms + {b:.2f} ms per row"
    a, b = step_cost(rows, "continuous")
    level = at if at in levels else levels[-1]
    static, continuous = closed("static", level), closed("continuous", level)
    per_token = [(a + b * r["rows_per_step"]) / r["rows_per_step"] for r in (static, continuous)]
    out["what filling the batch can gain at that cost"] = (
        f"{per_token[0] / per_token[1]:.2f}x per generated token ({static['rows_per_step']:.1f} -> "
        f"{continuous['rows_per_step']:.1f} rows a step)"
    )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for scheduling in ("static", "continuous"):
        points = sorted(
            (r["level"], r) for r in rows if r["scheduling"] == scheduling and r["mode"] == "closed"
        )
        levels = [level for level, _ in points]
        left.plot(levels, [r["requests_per_s"] for _, r in points], marker="o", label=scheduling)
        right.plot(levels, [r["p50_ms"] for _, r in points], marker="o", label=scheduling)
    left.set(xlabel="concurrency", ylabel="requests / s", title="throughput")
    right.set(xlabel="concurrency", ylabel="p50 ms", title="latency")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    maker = TextMaker(args.translation / "tokenizer.json")
    texts = sentences(maker, 64)
    rows = await scheduling_runs(args, texts)
    report: dict[str, Any] = {"rows": rows, "comparison": compare(rows), "settings": {
        "translation": str(args.translation), "variant": args.variant, "seconds": args.seconds,
        "max_batch_size": args.max_batch_size, "concurrency": args.concurrency}}  # fmt: skip
    if args.embedding:
        report["head_of_line"] = await head_of_line(args, maker)
    return report


def main() -> None:
    parser = measurement_parser(__doc__, "scheduling")
    parser.add_argument(
        "--translation", type=Path, required=True, help="a `pgw export` translation directory"
    )
    parser.add_argument("--embedding", type=Path, help="an embedding export, for the head-of-line runs")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[1, 2, 4, 8])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(main_async(args))
    write_measurement(args.out, "scheduling", report, markdown(report))
    plot(report["rows"], args.out / "scheduling.png")


if __name__ == "__main__":
    main()
