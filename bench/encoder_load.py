"""Encoders under mixed-length load: how the server's batching settings change throughput and latency as
concurrency rises, side by side in one run (a measurement, not a test).

    python -m bench.encoder_load EXPORT_DIR [EXPORT_DIR ...] [--variant int8] [--out DIR]

For each encoder export, one `pgw serve` per setting, all started together and loaded in turn (each load
point in two rounds, alternating which goes first):
- `one batch`: the defaults, one batch at a time on all the cores (max_padding_ratio 1.2 on the CPU; the
  model is the server's only one, so its ONNX Runtime threads spin between runs);
- `no spinning`: the same with the model's `spinning: false`;
- `no padding limit`, `padding 1.5`, `no padding`: the defaults with max_padding_ratio 0 (none), 1.5 (the
  default until 2026-12-02) and 1 (only texts of one length batch together);
- `no delay`: max_queue_delay_ms 0 (a batch forms as soon as the model is free, from what has queued);
- `two runs`: two batches at a time, each on one core (max_concurrent_batches 2, intra_op_threads 1).
`--settings` picks some of them.
Load: one text a request, 8 to 256 tokens in 8 languages (as `pgw bench`'s mixed scenario), closed loops
at each concurrency, then Poisson arrivals at 0.8 of each setting's best closed-loop rate. Writes
encoder_load.json, encoder_load.md and one plot per model to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from pathlib import Path
from typing import Any

import grpc

from bench.gateway import GatewayProcess
from bench.load import LoadResult, closed_loop, open_loop, warm_up
from bench.results import measurement_parser, write_measurement
from bench.texts import TextMaker
from gateway.manifest import Manifest
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc as pb_grpc

Settings = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # batching, server, model settings
SETTINGS: dict[str, Settings] = {
    "one batch": ({}, {}, {}),
    "no spinning": ({}, {}, {"spinning": False}),
    "no padding limit": ({"max_padding_ratio": 0}, {}, {}),
    "padding 1.5": ({"max_padding_ratio": 1.5}, {}, {}),
    "no padding": ({"max_padding_ratio": 1.0}, {}, {}),
    "no delay": ({"max_queue_delay_ms": 0}, {}, {}),
    "two runs": ({"max_concurrent_batches": 2}, {"intra_op_threads": 1}, {}),
}


def texts(export: Path, manifest: Manifest, count: int = 256) -> list[str]:
    maker = TextMaker(export / "tokenizer.json")
    rng = random.Random(0)
    made = [maker.text(rng.choice((8, 16, 32, 64, 128, 256)), offset=i).text for i in range(count)]
    mask = manifest.special_tokens.mask_token
    if manifest.task == "fill-mask" and mask:
        made = [t.replace(" ", f" {mask} ", 1) if " " in t else f"{t} {mask}" for t in made]
    return made


def caller(stub: pb_grpc.PolyglotStub, task: str, pool: list[str]) -> Any:
    rpc, request = {
        "embedding": (stub.Embed, pb.EmbedRequest),
        "token-classification": (stub.Classify, pb.ClassifyRequest),
        "fill-mask": (stub.FillMask, pb.FillMaskRequest),
    }[task]

    async def call(index: int) -> tuple[int, int]:
        reply = await rpc(request(texts=[pool[index % len(pool)]], model="m"), timeout=600)
        return 1, int(reply.usage.input_tokens)

    return call


async def model_runs(export: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    manifest = Manifest.read(export)
    pool = texts(export, manifest)
    gateways = {
        name: GatewayProcess(
            "m", export, args.variant, args.work, batching=batching, server=server, model=model,
            label=f"{export.name}-{name.replace(' ', '-')}",
        )
        for name, (batching, server, model) in SETTINGS.items()
        if name in args.settings
    }  # fmt: skip
    for gateway in gateways.values():
        gateway.start()
    rows: list[dict[str, Any]] = []
    channels = {name: grpc.aio.insecure_channel(g.address) for name, g in gateways.items()}
    try:
        calls = {name: caller(pb_grpc.PolyglotStub(c), manifest.task, pool) for name, c in channels.items()}
        for call in calls.values():
            await warm_up(call, 16, concurrency=4)

        async def point(level: float, load: Any) -> None:
            results: dict[str, list[LoadResult]] = {name: [] for name in calls}
            for turn in range(2):
                order = list(calls) if turn % 2 == 0 else list(reversed(calls))
                for name in order:
                    results[name].append(await load(calls[name], name))
            for name, runs in results.items():
                # level: for open loops the fraction of the best rate, not the rate itself
                summary = LoadResult.merged(runs).summary() | {"level": level}
                rows.append({"model": export.name, "setting": name, **summary})

        for concurrency in args.concurrency:
            await point(
                concurrency,
                lambda call, _, c=concurrency: closed_loop(call, c, seconds=args.seconds / 2),
            )  # fmt: skip
        best = {
            name: max(r["requests_per_s"] for r in rows if r["setting"] == name and r["model"] == export.name)
            for name in calls
        }
        await point(
            0.8,
            lambda call, name: open_loop(call, 0.8 * best[name], args.seconds / 2),
        )  # fmt: skip
    finally:
        for channel in channels.values():
            await channel.close()
        for gateway in gateways.values():
            gateway.stop()
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# Encoders under mixed-length load: batching settings side by side",
        "",
        f"`python -m bench.encoder_load`: {args.variant}, one text a request (8-256 tokens), "
        f"{args.seconds:.0f} s a point in two alternating rounds; `open` is Poisson arrivals at 0.8 of "
        "the setting's best closed-loop rate.",
        "",
        "| model | setting | load | req/s | p50 ms | p99 ms | c8 / c1 req/s | p50 c8 / c1 "
        "| open p50 / c1 p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = [r for r in rows if r["model"] == row["model"] and r["setting"] == row["setting"]]
        one = next(r for r in same if r["mode"] == "closed" and r["level"] == 1)
        top = max((r for r in same if r["mode"] == "closed"), key=lambda r: r["level"])
        extra = "| | |"
        if row is top:
            extra = (
                f"| {top['requests_per_s'] / one['requests_per_s']:.2f} | "
                f"{top['p50_ms'] / one['p50_ms']:.2f} | |"
            )
        if row["mode"] == "open":
            extra = f"| | | {row['p50_ms'] / one['p50_ms']:.2f} |"
        load = f"closed x{row['level']}" if row["mode"] == "closed" else "open 0.8"
        lines.append(
            f"| {row['model']} | {row['setting']} | {load} | {row['requests_per_s']:.1f} | "
            f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} {extra}"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for model in sorted({r["model"] for r in rows}):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for setting in args.settings:
            mine = [
                r for r in rows if r["model"] == model and r["setting"] == setting and r["mode"] == "closed"
            ]
            levels = [r["level"] for r in mine]
            left.plot(levels, [r["requests_per_s"] for r in mine], marker="o", label=setting)
            right.plot(levels, [r["p50_ms"] for r in mine], marker="o", label=setting)
        left.set(xlabel="concurrency", ylabel="requests / s", title=f"{model}: throughput")
        right.set(xlabel="concurrency", ylabel="p50 ms", title=f"{model}: p50 latency")
        left.legend()
        fig.tight_layout()
        fig.savefig(args.out / f"{model}-encoder-load.png", dpi=100)
        plt.close(fig)


def main() -> None:
    parser = measurement_parser(__doc__, "encoder-load")
    parser.add_argument("exports", type=Path, nargs="+", help="`pgw export` directories of encoders")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--seconds", type=float, default=10, help="per load point and setting")
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pgw-bench-encoder-load"))
    parser.add_argument(
        "--settings",
        type=lambda v: v.split(","),
        default=list(SETTINGS),
        help=f"comma-separated, of: {', '.join(SETTINGS)}",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    rows: list[dict[str, Any]] = []
    for export in args.exports:
        rows += asyncio.run(model_runs(export, args))
    write_measurement(args.out, "encoder_load", rows, markdown(rows, args))
    plot(rows, args)


if __name__ == "__main__":
    main()
