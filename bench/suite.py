"""The benchmark suite: per task and variant, the gateway under load (its own process, over gRPC), then the
baselines on the same token ids in this process, then the comparisons the README quotes.

Shapes compared with the baselines (model-only for them, end to end for the gateway), per device profile:
- CPU: encoders `1x32` (one text of 32 tokens: latency) and `32x128` (32 texts of 128 tokens: throughput);
  translation `1x32->32` and `8x32->32` (greedy, 32 source tokens, exactly 32 new tokens);
- GPU: encoders also `256x128` (saturation); translation `1x48->48` and `8x48->48`.
Load runs: closed-loop concurrency sweeps on a mixed-length multilingual scenario and Poisson arrivals at
fractions of the best closed-loop rate.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench import runs
from bench.compare import agreement
from bench.profiles import MODELS, Settings
from bench.report import publish
from bench.results import Results, machine
from bench.runs import Progress
from bench.texts import TextMaker
from gateway.manifest import Manifest

__all__ = ["Progress", "run_suite"]


def run_suite(settings: Settings, progress: Progress) -> Results:
    started = time.monotonic()
    runs.prepare(settings, progress)
    results = Results(
        meta={
            "machine": machine(settings.profile.device),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()},
        }
    )
    for name in settings.models:
        task = MODELS[name].task
        export = settings.work / "exports" / name
        manifest = Manifest.read(export)
        maker = TextMaker(export / manifest.tokenizer_file)
        produced: dict[str, dict[str, list[list[int]]]] = {}
        for variant in settings.variants:
            target = runs.Target(name, task, variant, maker, manifest)
            produced[f"gateway-{variant}"] = asyncio.run(
                runs.gateway_runs(settings, target, results, progress)
            )
            if settings.triton:
                produced[f"gateway-triton-{variant}"] = runs.with_triton(settings, target, results, progress)
        if settings.baselines:
            if task == "translation":
                runs.translation_baselines(settings, name, maker, manifest, results, progress, produced)
            else:
                runs.encoder_baselines(settings, name, task, maker, manifest, results, progress)
        if task == "translation" and "pytorch-fp32" in produced:
            reference = produced["pytorch-fp32"]
            for engine, outputs in produced.items():
                for shape, rows in outputs.items():
                    results.agreement.append(
                        {
                            "model": name,
                            "scenario": shape,
                            "engine": engine,
                            "reference": "pytorch-fp32",
                            "token_agreement": agreement(reference[shape], rows),
                            "new_tokens": [len(r) for r in rows],
                        }
                    )
        # Written after every model, so that a long run that stops keeps what it measured.
        results.meta["seconds"] = round(time.monotonic() - started, 1)
        publish(results, settings.out)
    return results
