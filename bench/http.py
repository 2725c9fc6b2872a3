"""HTTP/JSON against gRPC: the same requests to one `pgw serve`, side by side (a measurement, not a test).

    python -m bench.http EMBEDDING_EXPORT TRANSLATION_EXPORT [--variant int8] [--seconds 6] [--out DIR]

One server serves both exports with HTTP on. Each shape runs over gRPC (`Embed`, `Translate`), over the
JSON route made from the rpc (`/v1/embed`, `/v1/translate`) and, for embeddings, over OpenAI's
`/v1/embeddings` (vectors normalized, as `Embed` is asked to here): one caller at a time, two alternating
rounds of `--seconds` each. Shapes: Embed 1x32 and 32x128 (texts x tokens), Translate one sentence of 32
tokens to 16 new ones. A persistent httpx connection (HTTP/1.1 keep-alive) and one gRPC channel. The
overhead per request is the p50 difference to gRPC. Writes http.json and http.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench.gateway import GatewayProcess, free_port
from bench.load import LoadResult, closed_loop, warm_up
from bench.results import measurement_parser, write_measurement
from bench.texts import TextMaker
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc as pb_grpc

NEW_TOKENS = 16


def calls(
    stub: pb_grpc.PolyglotStub, http: httpx.AsyncClient, embed: TextMaker, translate: TextMaker
) -> dict[str, dict[str, Any]]:
    """shape -> transport -> call."""
    shapes: dict[str, dict[str, Any]] = {}
    for count, tokens in ((1, 32), (32, 128)):
        texts = [embed.text(tokens, offset=i).text for i in range(count)]

        async def grpc_embed(index: int, texts: list[str] = texts) -> tuple[int, int]:
            reply = await stub.Embed(pb.EmbedRequest(texts=texts, model="e", normalize=True), timeout=600)
            return len(texts), int(reply.usage.input_tokens)

        async def json_embed(index: int, texts: list[str] = texts) -> tuple[int, int]:
            reply = await http.post("/v1/embed", json={"texts": texts, "model": "e", "normalize": True})
            reply.raise_for_status()
            return len(texts), int(reply.json()["usage"]["input_tokens"])

        async def openai_embed(index: int, texts: list[str] = texts) -> tuple[int, int]:
            reply = await http.post("/v1/embeddings", json={"input": texts, "model": "e"})
            reply.raise_for_status()
            return len(texts), int(reply.json()["usage"]["prompt_tokens"])

        shapes[f"Embed {count}x{tokens}"] = {
            "gRPC": grpc_embed,
            "/v1/embed": json_embed,
            "/v1/embeddings": openai_embed,
        }

    sentence = translate.text(32, lang="eng_Latn").text
    options = {"max_new_tokens": NEW_TOKENS}

    async def grpc_translate(index: int) -> tuple[int, int]:
        request = pb.TranslateRequest(
            texts=[sentence], model="t", source_lang="eng_Latn", target_lang="deu_Latn",
            options=pb.TranslateOptions(max_new_tokens=NEW_TOKENS),
        )  # fmt: skip
        reply = await stub.Translate(request, timeout=600)
        return 1, int(reply.usage.input_tokens)

    async def json_translate(index: int) -> tuple[int, int]:
        body = {
            "texts": [sentence],
            "model": "t",
            "source_lang": "eng_Latn",
            "target_lang": "deu_Latn",
            "options": options,
        }
        reply = await http.post("/v1/translate", json=body)
        reply.raise_for_status()
        return 1, int(reply.json()["usage"]["input_tokens"])

    shapes[f"Translate 1x32->{NEW_TOKENS}"] = {"gRPC": grpc_translate, "/v1/translate": json_translate}
    return shapes


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    http_port = free_port()
    gateway = GatewayProcess(
        "e", args.embedding, args.variant, args.work, server={"http_port": http_port},
        extra_models=[{"name": "t", "path": str(args.translation), "variant": args.variant}], label="http",
    )  # fmt: skip
    gateway.start()
    rows: list[dict[str, Any]] = []
    try:
        async with (
            grpc.aio.insecure_channel(gateway.address) as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=600) as http,
        ):
            stub = pb_grpc.PolyglotStub(channel)
            embed = TextMaker(args.embedding / "tokenizer.json")
            translate = TextMaker(args.translation / "tokenizer.json")
            for shape, transports in calls(stub, http, embed, translate).items():
                for call in transports.values():
                    await warm_up(call, 3)
                results: dict[str, list[LoadResult]] = {name: [] for name in transports}
                for turn in range(2):
                    order = list(transports) if turn % 2 == 0 else list(reversed(transports))
                    for name in order:
                        results[name].append(await closed_loop(transports[name], 1, seconds=args.seconds))
                for name, runs in results.items():
                    rows.append({"shape": shape, "transport": name, **LoadResult.merged(runs).summary()})
    finally:
        gateway.stop()
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# HTTP/JSON against gRPC, same server, same requests",
        "",
        f"`python -m bench.http`: {args.variant}, one caller, {args.seconds:.0f} s per transport in each "
        "of two alternating rounds; overhead = p50 minus gRPC's p50.",
        "",
        "| shape | transport | requests | p50 ms | p90 ms | mean ms | p50 / gRPC | overhead ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        grpc_row = next(r for r in rows if r["shape"] == row["shape"] and r["transport"] == "gRPC")
        lines.append(
            f"| {row['shape']} | {row['transport']} | {row['ok']} | {row['p50_ms']:.2f} | "
            f"{row['p90_ms']:.2f} | {row['mean_ms']:.2f} | {row['p50_ms'] / grpc_row['p50_ms']:.3f} | "
            f"{row['p50_ms'] - grpc_row['p50_ms']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = measurement_parser(__doc__, "http")
    parser.add_argument("embedding", type=Path, help="an embedding export (`pgw export --task embedding`)")
    parser.add_argument("translation", type=Path, help="a translation export")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pgw-bench-http"))
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    write_measurement(args.out, "http", rows, markdown(rows, args))


if __name__ == "__main__":
    main()
