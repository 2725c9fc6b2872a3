"""The runs of the benchmark: preparing the models, the gateway under load (its own process, over gRPC), the
baselines on the same token ids in this process, and the gateway on a local tritonserver."""

from __future__ import annotations

import asyncio
import gc
import random
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc

from bench import baselines
from bench.gateway import GatewayProcess, server_split
from bench.load import Call, LoadResult, closed_loop, open_loop, warm_up
from bench.profiles import MODELS, Settings
from bench.results import Results
from bench.texts import TextMaker
from gateway.manifest import Manifest, Task, is_current
from gateway.pb.polyglot.v1 import polyglot_pb2 as pb
from gateway.pb.polyglot.v1 import polyglot_pb2_grpc

Progress = Callable[[str], None]  # what the suite is doing now

# ------------------------------------------------------------------------------------------ preparation


def prepare(settings: Settings, progress: Progress) -> None:
    """Build the demo checkpoints and exports that are missing (tiny: seconds; full: long)."""
    missing = [m for m in settings.models if not is_current(settings.work / "exports" / m)]
    if not missing:
        return
    from gateway.export.demo import build_demo_models
    from gateway.export.exporter import ExportOptions, export_model

    checkpoints = settings.work / "checkpoints"
    sources = sorted(
        {MODELS[m].checkpoint for m in missing if not (checkpoints / MODELS[m].checkpoint).is_dir()}
    )
    if sources:
        progress(f"building demo checkpoints ({settings.size})")
        build_demo_models(checkpoints, settings.size, seed=0, names=sources)  # type: ignore[arg-type]
    variants = tuple(dict.fromkeys(("fp32", *settings.variants)))  # fp32 is every variant's reference
    for name in missing:
        source, task = MODELS[name].checkpoint, MODELS[name].task
        progress(f"exporting {name}")
        options = ExportOptions(task=task, variants=variants)  # type: ignore[arg-type]
        export_model(checkpoints / source, settings.work / "exports" / name, options)


# ------------------------------------------------------------------------------------------ gateway runs


_REQUESTS: dict[str, Any] = {
    "embedding": pb.EmbedRequest,
    "token-classification": pb.ClassifyRequest,
    "fill-mask": pb.FillMaskRequest,
}


def _request_factory(
    task: Task, name: str, texts: list[str], per_request: int = 1, new_tokens: int = 32
) -> Callable[[int], Any]:
    """Request i of a scenario: `per_request` texts, cycling through `texts`."""

    def make(index: int) -> Any:
        start = index * per_request
        chosen = [texts[(start + k) % len(texts)] for k in range(per_request)]
        if task == "translation":
            return pb.TranslateRequest(
                texts=chosen,
                source_lang="eng_Latn",
                target_lang="fra_Latn",
                model=name,
                options=pb.TranslateOptions(max_new_tokens=new_tokens),
            )
        return _REQUESTS[task](texts=chosen, model=name)

    return make


class Client:
    """One channel to the gateway and the rpc of a task."""

    def __init__(self, address: str, task: Task) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        stub = polyglot_pb2_grpc.PolyglotStub(self.channel)
        self.task = task
        self.rpc = {
            "embedding": stub.Embed,
            "token-classification": stub.Classify,
            "fill-mask": stub.FillMask,
            "translation": stub.Translate,
        }[task]

    def call(self, make: Callable[[int], Any]) -> Call:
        async def call(index: int) -> tuple[int, int]:
            request = make(index)
            reply = await self.rpc(request, timeout=600)
            return len(request.texts), int(reply.usage.input_tokens + reply.usage.output_tokens)

        return call

    async def close(self) -> None:
        await self.channel.close()


def _fill_mask_texts(texts: list[str], mask: str) -> list[str]:
    """Each text with its middle word replaced by the mask token."""
    out = []
    for text in texts:
        words = text.split(" ")
        if len(words) > 2:
            words[len(words) // 2] = mask
            out.append(" ".join(words))
        else:
            out.append(f"{text} {mask}")
    return out


@dataclass(frozen=True)
class Target:
    """One model variant under test, and what its inputs are made with."""

    name: str
    task: Task
    variant: str
    maker: TextMaker
    manifest: Manifest


async def gateway_runs(
    settings: Settings, target: Target, results: Results, progress: Progress, triton: str | None = None
) -> dict[str, list[list[int]]]:
    """The load runs of one model variant (in-process, or on Triton at `triton`); returns the token ids it
    translated (for agreement)."""
    name, task, variant, maker, manifest = (
        target.name,
        target.task,
        target.variant,
        target.maker,
        target.manifest,
    )
    export = settings.work / "exports" / name
    profile = settings.profile
    gateway = GatewayProcess(
        name,
        export,
        variant,
        settings.out / "logs",
        batching=profile.batching,
        triton=triton,
        device=profile.device,
    )
    backend = "triton" if triton else "onnxruntime"
    progress(f"{name} {variant}: starting the gateway")
    gateway.start()
    client = Client(gateway.address, task)
    produced: dict[str, list[list[int]]] = {}

    async def measure(scenario: str, load: Awaitable[LoadResult]) -> dict[str, Any]:
        """One load run, with the server's own figures for its duration."""
        before = gateway.scrape()
        run = await load
        row: dict[str, Any] = {"model": name, "task": task, "variant": variant, "backend": backend}
        row["scenario"] = scenario
        row.update(run.summary())
        row.update(server_split(before, gateway.scrape()))
        results.runs.append(row)
        return row

    try:
        mask = manifest.special_tokens.mask_token or ""
        adapt = (lambda t: _fill_mask_texts(t, mask)) if task == "fill-mask" else (lambda t: t)
        rng = random.Random(0)
        # shape -> (texts, tokens per text without special tokens, new tokens)
        shapes: dict[str, tuple[int, int, int]]
        if task == "translation":
            shapes = profile.translation_shapes
            mixed = [maker.text(rng.choice((8, 16, 30, 60)), "eng_Latn", offset=i).text for i in range(64)]
        else:
            shapes = {k: (n, tokens, 0) for k, (n, tokens) in profile.encoder_shapes.items()}
            mixed = [maker.text(rng.choice((8, 16, 32, 64, 128, 256)), offset=i).text for i in range(256)]
        # The fixed shapes: one request of N texts at a time, as the baselines run them.
        for shape, (count, tokens, new_tokens) in shapes.items():
            lang = "eng_Latn" if task == "translation" else None
            texts = adapt([t.text for t in maker.texts(count * 4, tokens, lang)])
            make = _request_factory(task, name, texts, count, new_tokens)
            if task == "translation":
                reply = await client.rpc(make(0), timeout=600)
                produced[shape] = [list(t.hypotheses[0].token_ids) for t in reply.translations]
            call = client.call(make)
            progress(f"{name} {variant}: {shape} warm-up")
            await warm_up(call, settings.warmup)
            for concurrency in settings.shape_concurrency:
                progress(f"{name} {variant}: {shape} x{concurrency}")
                await measure(shape, closed_loop(call, concurrency, seconds=settings.seconds))
        # Mixed lengths and languages: the concurrency sweep, then Poisson arrivals.
        call = client.call(_request_factory(task, name, adapt(mixed)))
        await warm_up(call, settings.warmup)
        best = 0.0
        for concurrency in settings.concurrency:
            progress(f"{name} {variant}: mixed x{concurrency}")
            row = await measure("mixed", closed_loop(call, concurrency, seconds=settings.seconds))
            best = max(best, row["requests_per_s"])
        for fraction in settings.poisson:
            rate = max(0.2, best * fraction)
            progress(f"{name} {variant}: Poisson {rate:.1f}/s")
            row = await measure("mixed", open_loop(call, rate, settings.seconds))
            row["offered_fraction"] = fraction
    finally:
        await client.close()
        gateway.stop()
    return produced


# ------------------------------------------------------------------------------------------- baselines


def encoder_baselines(
    settings: Settings,
    name: str,
    task: Task,
    maker: TextMaker,
    manifest: Manifest,
    results: Results,
    progress: Progress,
) -> None:
    checkpoint = settings.work / "checkpoints" / MODELS[name].checkpoint
    tokenizer = maker.tokenizer
    mask = manifest.special_tokens.mask_token or ""
    profile = settings.profile
    batches = {}
    for shape, (count, tokens) in profile.encoder_shapes.items():
        texts = [t.text for t in maker.texts(count, tokens)]
        if task == "fill-mask":
            texts = _fill_mask_texts(texts, mask)
        batches[shape] = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=True)]
    pad, device, export = manifest.special_tokens.pad_id, profile.device, settings.work / "exports" / name
    engines: list[Callable[[], Any]] = [
        *[partial(baselines.TorchEncoder, checkpoint, task, pad, p, device) for p in profile.encoder_engines],
        *[partial(baselines.OrtEncoder, export, v, device) for v in settings.variants],
    ]
    for make in engines:
        engine = make()
        for shape, batch in batches.items():
            progress(f"{name}: {engine.name} {shape}")
            seconds, _ = baselines.timed(partial(engine.run, batch), settings.repeats)
            results.shapes.append(
                {
                    "model": name,
                    "task": task,
                    "scenario": shape,
                    "engine": engine.name,
                    "seconds": seconds,
                    "texts_per_s": len(batch) / seconds,
                    "tokens": sum(len(r) for r in batch),
                }
            )
        del engine
        gc.collect()


def translation_baselines(
    settings: Settings,
    name: str,
    maker: TextMaker,
    manifest: Manifest,
    results: Results,
    progress: Progress,
    produced: dict[str, dict[str, list[list[int]]]],
) -> None:
    checkpoint = settings.work / "checkpoints" / MODELS[name].checkpoint
    export = settings.work / "exports" / name
    info = manifest.translation
    eos = manifest.special_tokens.eos_id
    assert info is not None
    assert eos is not None
    source_id, target_id = info.language_token_ids["eng_Latn"], info.language_token_ids["fra_Latn"]
    tokenizer = maker.tokenizer
    profile = settings.profile
    batches = {}
    for shape, (count, source_tokens, _) in profile.translation_shapes.items():
        texts = [t.text for t in maker.texts(count, source_tokens, "eng_Latn")]
        batches[shape] = [
            [source_id, *e.ids, eos] for e in tokenizer.encode_batch(texts, add_special_tokens=False)
        ]
    pad, device = manifest.special_tokens.pad_id, profile.device

    def to_tokens(ids: list[int]) -> list[str]:
        return [tokenizer.id_to_token(i) or "<unk>" for i in ids]

    engines: list[Callable[[], Any]] = [
        partial(baselines.TorchTranslator, checkpoint, precision, device, static)
        for precision, static in profile.translation_engines
    ]
    engines += [partial(baselines.OrtTranslator, export, v, device) for v in settings.variants]
    if profile.ctranslate2:
        try:
            converted = baselines.convert_ctranslate2(checkpoint, settings.work / "ctranslate2" / name)
            engines += [
                partial(baselines.CTranslate2Translator, converted, c, to_tokens) for c in ("int8", "float32")
            ]
        except ImportError:
            progress("ctranslate2 is not installed: no CTranslate2 rows")
    for make in engines:
        engine = make()
        for shape, batch in batches.items():
            new_tokens = profile.translation_shapes[shape][2]
            progress(f"{name}: {engine.name} {shape}")
            seconds, out = baselines.timed(
                partial(engine.run, batch, target_id, new_tokens, pad), settings.repeats
            )
            ids = [[tokenizer.token_to_id(t) if isinstance(t, str) else t for t in row] for row in out]
            produced.setdefault(engine.name, {})[shape] = [
                [i for i in row if i != eos][:new_tokens] for row in ids
            ]
            results.shapes.append(
                {
                    "model": name,
                    "task": "translation",
                    "scenario": shape,
                    "engine": engine.name,
                    "seconds": seconds,
                    "texts_per_s": len(batch) / seconds,
                    "new_tokens": [len(r) for r in ids],
                }
            )
        del engine
        gc.collect()


def with_triton(
    settings: Settings, target: Target, results: Results, progress: Progress
) -> dict[str, list[list[int]]]:
    """The same gateway runs with the model on a tritonserver of its own (nvidia-pytriton's, Python flavor:
    the Triton build available on CPU here)."""
    from bench.gateway import free_port
    from gateway.triton.process import Ports, TritonServer
    from gateway.triton.repository import TritonOptions, write_repository

    name, variant = target.name, target.variant
    repository = settings.work / "triton-repository" / f"{name}-{variant}"
    if repository.exists():
        shutil.rmtree(repository)
    repository.mkdir(parents=True)
    write_repository(
        settings.work / "exports" / name, repository, TritonOptions(flavor="python"), variants=(variant,)
    )
    progress(f"{name} {variant}: starting tritonserver")
    server = TritonServer(
        repository, settings.work / "triton-state", Ports(free_port(), free_port(), free_port())
    )
    server.start()
    try:
        server.wait_ready(600)
        return asyncio.run(
            gateway_runs(settings, target, results, progress, f"127.0.0.1:{server.ports.grpc}")
        )
    finally:
        server.stop()
