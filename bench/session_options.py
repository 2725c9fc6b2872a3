"""ONNX Runtime session options one by one on an encoder export (a measurement, not a test).

    python -m bench.session_options EXPORT_DIR [--variant int8] [--rounds 7] [--out DIR]

The gateway's options (`OnnxRuntimeBackend`: all graph optimizations, inter-op 1, intra-op one thread
per core, spinning as `ModelConfig.spinning` says, the memory arena on), then each changed alone:
spinning, the CPU memory arena, the graph optimization level, the intra-op thread count. Every session
runs the same token ids at 1x32 (one text of 32 tokens) and 32x128, in alternating order over `--rounds`
rounds; the figure is the median time of a run. Writes session_options.json and session_options.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.results import measurement_parser, write_measurement
from gateway.manifest import Manifest

SHAPES = ((1, 32), (32, 128))


def options(changes: dict[str, Any]) -> ort.SessionOptions:
    settings: dict[str, Any] = {"spinning": False, "arena": True, "level": "all", "intra_op": 0} | changes
    made = ort.SessionOptions()
    made.inter_op_num_threads = 1
    made.intra_op_num_threads = settings["intra_op"]
    made.enable_cpu_mem_arena = settings["arena"]
    made.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[settings["level"]]
    made.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings["spinning"] else "0")
    made.log_severity_level = 3
    return made


VARIANTS: dict[str, dict[str, Any]] = {
    "gateway (several models)": {},
    "spinning on (one model)": {"spinning": True},
    "memory arena off": {"arena": False},
    "graph optimizations: extended": {"level": "extended"},
    "graph optimizations: basic": {"level": "basic"},
    "intra-op threads: 1": {"intra_op": 1},
}


def feeds(manifest: Manifest, names: list[str]) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    special = manifest.special_tokens
    low = (
        max(
            v
            for v in (special.pad_id, special.unk_id, special.cls_id, special.sep_id, special.mask_id)
            if v is not None
        )
        + 1
    )
    made = {}
    for count, tokens in SHAPES:
        ids = rng.integers(low, low + 5000, (count, tokens)).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        made[(count, tokens)] = {k: v for k, v in feed.items() if k in names}
    return made


def main() -> None:
    parser = measurement_parser(__doc__, "session-options")
    parser.add_argument("export", type=Path, help="a `pgw export` directory of an encoder")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    manifest = Manifest.read(args.export)
    path = str(args.export / manifest.variants[args.variant].parts["model"].file)
    sessions = {
        name: ort.InferenceSession(path, options(c), providers=["CPUExecutionProvider"])
        for name, c in VARIANTS.items()
    }
    names = [i.name for i in next(iter(sessions.values())).get_inputs()]
    inputs = feeds(manifest, names)
    times: dict[str, dict[str, list[float]]] = {n: {f"{c}x{t}": [] for c, t in SHAPES} for n in sessions}
    for session in sessions.values():  # warm-up
        for feed in inputs.values():
            session.run(None, feed)
    for round_number in range(args.rounds):
        order = list(sessions) if round_number % 2 == 0 else list(reversed(sessions))
        for name in order:
            for (count, tokens), feed in inputs.items():
                repeats = 20 if count == 1 else 2
                started = time.perf_counter()
                for _ in range(repeats):
                    sessions[name].run(None, feed)
                times[name][f"{count}x{tokens}"].append((time.perf_counter() - started) / repeats)
    rows: list[dict[str, Any]] = [
        {"options": name, **{shape: float(np.median(v)) * 1000 for shape, v in shapes.items()}}
        for name, shapes in times.items()
    ]
    base = rows[0]
    lines = [
        "# ONNX Runtime session options one by one",
        "",
        f"`python -m bench.session_options {args.export.name}` ({args.variant}, {os.cpu_count()} cores, "
        f"onnxruntime {ort.__version__}): median ms per run over {args.rounds} alternating rounds.",
        "",
        "| options | 1x32 ms | x gateway | 32x128 ms | x gateway |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['options']} | {row['1x32']:.2f} | {row['1x32'] / base['1x32']:.2f} | "
            f"{row['32x128']:.1f} | {row['32x128'] / base['32x128']:.2f} |"
        )
    write_measurement(args.out, "session_options", rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
