"""The translation engine's cache in host memory against ONNX Runtime values on the decoder's device, side by
side (a measurement, not a test).

    python -m bench.kv_cache NLLB_EXPORT [--variant int8] [--device cpu] [--rounds 5] [--out DIR]

Two engines over the same sessions: `kv_cache: numpy` (`batch.Batch`: each step's slot written in place,
the cache bound from host memory) and `kv_cache: ortvalue` (`resident.ResidentBatch`: every tensor an
OrtValue on the session's device, joined, trimmed and reordered by small graphs there). Workloads: greedy
1x32->32 and 8x32->32, beam 4 on 1x32->32 (a reorder at every step), and a continuous one (8 texts of 8-48
tokens, then 8 more joining one every 4 steps, each with its own limit: joins and removals). Alternating
order over `--rounds` rounds; the figure is the median seconds of a workload. Both caches' tokens are
compared: in fp32 they agree up to float rounding (the attention reads slot widths that differ: the numpy
cache keeps capacity, the resident one only what is used), which int8 can amplify into another token.
`auto` picks ortvalue for a session on a GPU, numpy on the CPU.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.results import measurement_parser, write_measurement
from gateway.backends.onnxruntime import OnnxRuntimeBackend, OrtSettings
from gateway.decoding.batch import StepParts
from gateway.decoding.engine import Engine, EngineSettings, KvCache
from gateway.decoding.search import DecodingOptions, GenerationItem
from gateway.manifest import Manifest
from gateway.runtime import part_settings

CACHES: tuple[KvCache, ...] = ("numpy", "ortvalue")


class Workloads:
    def __init__(self, manifest: Manifest, seed: int = 0) -> None:
        info = manifest.translation
        assert info is not None
        assert manifest.special_tokens.eos_id is not None
        self.eos = manifest.special_tokens.eos_id
        self.prefix = (info.decoder_start_token_id, info.language_token_ids["fra_Latn"])
        self.source_lang = info.language_token_ids["eng_Latn"]
        self.rng = np.random.default_rng(seed)
        self.words = min(info.language_token_ids.values())  # the language tokens follow the words

    def source(self, tokens: int) -> list[int]:
        words = self.rng.integers(4, self.words, tokens - 2).tolist()
        return [self.source_lang, *words, self.eos]

    def items(self, count: int, tokens: int, limit: int, options: DecodingOptions) -> list[GenerationItem]:
        return [GenerationItem(self.source(tokens), self.prefix, limit, options, i) for i in range(count)]


def run(engine: Engine, work: dict[str, Any]) -> list[list[int]]:
    """One workload to its end; the tokens of every text."""
    futures = [engine.submit(work["first"])]
    for item in work.get("later", []):
        for _ in range(4):
            engine._iteration()
        futures.append(engine.submit([item]))
    engine.run_all()
    return [tokens for f in futures for d in f.result().decoded for tokens in d.tokens]


def agreement(first: list[list[int]], second: list[list[int]]) -> float:
    """The share of token positions where two runs' outputs agree (a missing position disagrees)."""
    same = total = 0
    for a, b in zip(first, second, strict=True):
        total += max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b, strict=False))
    return same / total if total else 1.0


def main() -> None:
    parser = measurement_parser(__doc__, "kv-cache")
    parser.add_argument("export", type=Path, help="a `pgw export` directory of a translation model")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    manifest = Manifest.read(args.export)
    executor = ThreadPoolExecutor(1)
    parts = StepParts.of(
        {
            name: OnnxRuntimeBackend(
                args.export / spec.file, part_settings(OrtSettings(device=args.device), name), executor
            )
            for name, spec in manifest.variants[args.variant].parts.items()
        }
    )
    pad = manifest.special_tokens.pad_id
    made = Workloads(manifest)
    greedy, beam = DecodingOptions(), DecodingOptions(beam_size=4)
    workloads: dict[str, dict[str, Any]] = {
        "greedy 1x32->32": {"first": made.items(1, 32, 32, greedy)},
        "greedy 8x32->32": {"first": made.items(8, 32, 32, greedy)},
        "beam 4, 1x32->32": {"first": made.items(1, 32, 32, beam)},
        "continuous, 16 texts": {
            "first": [
                GenerationItem(made.source(int(n)), made.prefix, int(m), greedy, i)
                for i, (n, m) in enumerate(
                    zip(made.rng.integers(8, 48, 8), made.rng.integers(8, 40, 8), strict=True)
                )
            ],
            "later": [
                GenerationItem(made.source(int(n)), made.prefix, int(m), greedy, 0)
                for n, m in zip(made.rng.integers(8, 48, 8), made.rng.integers(8, 40, 8), strict=True)
            ],
        },
    }
    engines = {
        cache: Engine(cache, parts, made.eos, pad, EngineSettings(kv_cache=cache, max_batch_tokens=1 << 30))
        for cache in CACHES
    }
    tokens = {
        cache: {name: run(engine, work) for name, work in workloads.items()}
        for cache, engine in engines.items()
    }
    times: dict[str, dict[str, list[float]]] = {cache: {name: [] for name in workloads} for cache in CACHES}
    for round_number in range(args.rounds):
        order = CACHES if round_number % 2 == 0 else tuple(reversed(CACHES))
        for name, work in workloads.items():
            for cache in order:
                started = time.perf_counter()
                run(engines[cache], work)
                times[cache][name].append(time.perf_counter() - started)
    rows = []
    for name in workloads:
        host, resident = (float(np.median(times[c][name])) for c in CACHES)
        rows.append(
            {
                "workload": name,
                "numpy_s": host,
                "ortvalue_s": resident,
                "ortvalue_over_numpy": resident / host,
                "generated_tokens": sum(len(t) for t in tokens["numpy"][name]),
                "token_agreement": agreement(tokens["numpy"][name], tokens["ortvalue"][name]),
            }
        )
    step = parts.decoder_step
    provider = step.provider if isinstance(step, OnnxRuntimeBackend) else "?"
    lines = [
        "# Decoder cache: numpy (host) against OrtValues on the session's device",
        "",
        f"`python -m bench.kv_cache {args.export.name} --variant {args.variant} --device {args.device}` "
        f"({os.cpu_count()} cores, onnxruntime {ort.__version__}, {provider}): "
        f"median seconds of a workload over {args.rounds} alternating rounds.",
        "",
        "| workload | tokens | numpy s | ortvalue s | ortvalue / numpy | token agreement |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workload']} | {row['generated_tokens']} | {row['numpy_s']:.3f} | "
            f"{row['ortvalue_s']:.3f} | "
            f"{row['ortvalue_over_numpy']:.2f} | {row['token_agreement']:.3f} |"
        )
    write_measurement(args.out, "kv_cache", rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
