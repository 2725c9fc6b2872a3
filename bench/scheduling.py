"""Continuous against static scheduling of translation, side by side in one run, and head-of-line blocking
of an encoder by translations in the same server (a measurement, not a test).

    python -m bench.scheduling --translation EXPORT_DIR [--embedding EXPORT_DIR] [--variant int8]

1. For `static` then `continuous`, one `pgw serve` with the translation model: closed loops at each
   concurrency of mixed single-sentence requests (8-60 tokens, as many new tokens as the source has, so
   rows end at different steps), then Poisson arrivals at 0.8 of the best closed-loop rate. From the
   server's metrics: the mean wait to join the batch, in decoder steps (wait / mean step time).
2. Head-of-line: one-text Embed requests (closed loop, one caller) while two callers send 8-text beam-8
   translations, first with both models in one server, then with the translations on another server.
Writes scheduling.json, scheduling.md and scheduling.png to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.gateway import GatewayProcess
from bench.load import LoadResult, closed_loop, open_loop
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


def scrape(gateway: GatewayProcess) -> dict[str, float]:
    """Sums and counts of the engine's join wait and step time."""
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values: dict[str, float] = {}
    for metric in ("pgw_queue_duration_seconds", "pgw_engine_step_duration_seconds", "pgw_batch_size"):
        for kind in ("sum", "count"):
            total = 0.0
            for line in text.splitlines():
                if line.startswith(f"{metric}_{kind}{{") and f'model="{NLLB}"' in line:
                    total += float(line.rsplit(" ", 1)[1])
            values[f"{metric}_{kind}"] = total
    return values


def engine_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def mean(metric: str) -> float:
        count = after[f"{metric}_count"] - before[f"{metric}_count"]
        return (after[f"{metric}_sum"] - before[f"{metric}_sum"]) / count if count else 0.0

    wait, step = mean("pgw_queue_duration_seconds"), mean("pgw_engine_step_duration_seconds")
    return {
        "join_wait_ms": 1000 * wait,
        "step_ms": 1000 * step,
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


async def scheduling_runs(args: argparse.Namespace, texts: list[tuple[str, int]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for scheduling in ("static", "continuous"):
        batching = {"scheduling": scheduling, "max_batch_size": args.max_batch_size, "max_queue_delay_ms": 5}
        gateway = GatewayProcess(NLLB, args.translation, args.variant, args.out / "logs", batching=batching)
        gateway.start()
        try:
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                call = translate_call(pb_grpc.PolyglotStub(channel), texts)
                await closed_loop(call, 4, requests=8)  # warm-up
                for concurrency in args.concurrency:
                    before = scrape(gateway)
                    result = await closed_loop(call, concurrency, seconds=args.seconds)
                    rows.append(row(scheduling, result, engine_split(before, scrape(gateway))))
                best = max(r["requests_per_s"] for r in rows if r["scheduling"] == scheduling)
                before = scrape(gateway)
                result = await open_loop(call, 0.8 * best, args.seconds, seed=1)
                rows.append(row(scheduling, result, engine_split(before, scrape(gateway))))
        finally:
            gateway.stop()
    return rows


async def _embed_while_translating(
    embed_address: str, translate_address: str, maker: TextMaker, seconds: float
) -> dict[str, float]:
    """Embed p50/p99 (one caller) while two callers keep 8-text beam-8 translations in flight."""
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
    return {
        "embed_p50_ms": float(np.percentile(latencies, 50)),
        "embed_p99_ms": float(np.percentile(latencies, 99)),
        "embeds": float(len(latencies)),
    }


async def head_of_line(args: argparse.Namespace, maker: TextMaker) -> dict[str, Any]:
    embed_model = {"name": EMBED, "path": str(args.embedding), "variant": args.variant}
    together = GatewayProcess(
        NLLB, args.translation, args.variant, args.out / "logs", extra_models=[embed_model]
    )
    together.start()
    try:
        same = await _embed_while_translating(together.address, together.address, maker, args.seconds)
    finally:
        together.stop()
    translator = GatewayProcess(NLLB, args.translation, args.variant, args.out / "logs" / "apart")
    embedder = GatewayProcess(EMBED, args.embedding, args.variant, args.out / "logs" / "apart")
    translator.start()
    embedder.start()
    try:
        apart = await _embed_while_translating(embedder.address, translator.address, maker, args.seconds)
    finally:
        translator.stop()
        embedder.stop()
    return {
        "same_server": same,
        "separate_servers": apart,
        "p99_ratio": same["embed_p99_ms"] / apart["embed_p99_ms"],
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| scheduling | load | requests/s | tokens/s | p50 ms | p99 ms | join wait ms | steps | rows/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        load = f"closed x{r['level']}" if r["mode"] == "closed" else f"Poisson {r['level']:.2f}/s"
        lines.append(
            f"| {r['scheduling']} | {load} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r.get('join_wait_ms', 0):.0f} | "
            f"{r.get('join_wait_steps', 0):.2f} | {r.get('rows_per_step', 0):.1f} |"
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


def compare(rows: list[dict[str, Any]]) -> dict[str, str]:
    def closed(scheduling: str, level: int) -> dict[str, Any]:
        return next(
            r for r in rows if r["scheduling"] == scheduling and r["mode"] == "closed" and r["level"] == level
        )

    top = max(r["level"] for r in rows if r["mode"] == "closed")
    poisson = next(r for r in rows if r["scheduling"] == "continuous" and r["mode"] == "open")
    static_top, continuous_top = closed("static", top), closed("continuous", top)
    one_static, one_continuous = closed("static", 1), closed("continuous", 1)
    return {
        f"throughput at concurrency {top}, continuous / static": (
            f"{continuous_top['requests_per_s'] / static_top['requests_per_s']:.2f}x "
            f"({continuous_top['requests_per_s']:.2f} vs {static_top['requests_per_s']:.2f} req/s)"
        ),
        f"mean join wait at concurrency {top} (continuous)": (
            f"{continuous_top['join_wait_steps']:.2f} decoder steps"
        ),
        "p50 at concurrency 1, continuous / static": (
            f"{one_continuous['p50_ms'] / one_static['p50_ms']:.3f} ({one_continuous['p50_ms']:.0f} vs "
            f"{one_static['p50_ms']:.0f} ms)"
        ),
        "Poisson at 0.8 of the best rate, p50 / concurrency-1 p50 (continuous)": (
            f"{poisson['p50_ms'] / one_continuous['p50_ms']:.2f}x ({poisson['p50_ms']:.0f} vs "
            f"{one_continuous['p50_ms']:.0f} ms)"
        ),
    }


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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--translation", type=Path, required=True, help="a `pgw export` translation directory"
    )
    parser.add_argument("--embedding", type=Path, help="an embedding export, for the head-of-line runs")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[1, 2, 4, 8])
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results") / f"{time.strftime('%Y-%m-%d')}-scheduling"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(main_async(args))
    (args.out / "scheduling.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "scheduling.md").write_text(markdown(report))
    plot(report["rows"], args.out / "scheduling.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
