"""What the report quotes: each gateway run against the reference and the best other engine, and token
agreement between translation engines."""

from __future__ import annotations

from typing import Any

from bench.profiles import PROFILES
from bench.results import Results


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    same = total = 0
    for a, b in zip(reference, other, strict=True):
        total += max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b, strict=False))
    return same / total if total else 1.0


def comparisons(results: Results) -> list[dict[str, Any]]:
    """Per model and shape: each gateway run against the profile's PyTorch reference (fp32 on CPU, fp16 on
    GPU) and the best other engine. Ratios are speed-ups (higher is better): of 1 / p50 latency on the
    batch-1 shapes, of texts per second on the others."""
    found: list[dict[str, Any]] = []
    reference = PROFILES[results.meta["settings"].get("device", "cpu")].reference
    for row in results.runs:
        latency = row["scenario"].startswith("1x")
        if row["scenario"] == "mixed" or (latency and row["level"] != 1):
            continue
        peers = [s for s in results.shapes if s["model"] == row["model"] and s["scenario"] == row["scenario"]]
        if not peers:
            continue
        # speed: higher is better
        if latency:
            value, mine = row["p50_ms"] / 1000, 1000 / row["p50_ms"]
            speed = {p["engine"]: 1 / p["seconds"] for p in peers}
            native = {p["engine"]: p["seconds"] for p in peers}
        else:
            value = mine = row["texts_per_s"]
            speed = native = {p["engine"]: p["texts_per_s"] for p in peers}
        direct = f"onnxruntime-{row['variant']}"
        others = {k: v for k, v in speed.items() if not k.startswith("onnxruntime")}
        best = max(others, key=others.__getitem__) if others else None
        found.append(
            {
                "model": row["model"],
                "scenario": row["scenario"],
                "variant": row["variant"],
                "backend": row.get("backend", "onnxruntime"),
                "metric": "p50 latency (s, lower is better)" if latency else "texts/s (higher is better)",
                "concurrency": row["level"],
                "gateway": value,
                "reference": reference,
                "reference_value": native.get(reference),
                "speedup_vs_reference": mine / speed[reference] if reference in speed else None,
                "best_other": best,
                "speedup_vs_best_other": mine / others[best] if best else None,
                "onnxruntime_direct": native.get(direct),
                "gateway_vs_onnxruntime_direct": mine / speed[direct] if direct in speed else None,
            }
        )
    return found
