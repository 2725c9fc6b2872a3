"""What a benchmark run measured (`Results`), the machine it ran on, and its results.json."""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import baselines
from gateway import __version__


@dataclass
class Results:
    meta: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)  # gateway load runs
    shapes: list[dict[str, Any]] = field(default_factory=list)  # gateway and baselines on the fixed shapes
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    agreement: list[dict[str, Any]] = field(default_factory=list)


def machine(device: str = "cpu") -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": cpu,
        "cores": baselines.threads(),
        "python": platform.python_version(),
        "gateway": __version__,
        "onnxruntime": onnxruntime.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for package in ("torch", "transformers", "ctranslate2", "tritonclient"):
        try:
            info[package] = __import__(package).__version__
        except Exception:
            info[package] = None
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return info


def write_json(results: Results, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.__dict__, indent=1), encoding="utf-8")


def read_json(out: Path) -> Results:
    return Results(**json.loads((out / "results.json").read_text(encoding="utf-8")))


def measurement_parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """The command line of a standalone measurement (`python -m bench.<name>`): its docstring as help, and
    `--out` (default bench/results/<date>-<name>)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results") / f"{datetime.now().strftime('%Y-%m-%d')}-{name}"
    )
    return parser


def write_measurement(out: Path, name: str, data: Any, report: str) -> None:
    """A standalone measurement's `<name>.json` (every figure) and `<name>.md` (the report), also printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text(report)
    print(report)
