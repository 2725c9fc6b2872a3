"""What the benchmark runs: the models, the per-device profiles (shapes, variants, baselines, batching) and
the settings of one run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import baselines
from gateway.export.demo import DEMO_MODELS, DemoModel

# served name -> its demo checkpoint and task
MODELS: dict[str, DemoModel] = {demo.name: demo for demo in DEMO_MODELS}


@dataclass(frozen=True)
class Profile:
    """What a device is benchmarked with: shapes, default variants, baselines, the gateway's batching."""

    device: str
    variants: tuple[str, ...]
    # encoders: name -> (texts, tokens per text without the two special tokens)
    encoder_shapes: dict[str, tuple[int, int]]
    # translation: name -> (texts, source tokens without the language token and </s>, new tokens)
    translation_shapes: dict[str, tuple[int, int, int]]
    encoder_engines: tuple[baselines.Precision, ...]  # PyTorch's, besides ONNX Runtime on every variant
    translation_engines: tuple[tuple[baselines.Precision, bool], ...]  # the same, and a static cache?
    ctranslate2: bool  # CTranslate2 int8 and float32 (CPU)
    reference: str  # the engine the README's "x PyTorch" ratios divide by
    batching: dict[str, Any] | None = None  # the gateway's batching section; None: its defaults


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        device="cpu",
        variants=("fp32", "int8"),
        encoder_shapes={"1x32": (1, 30), "32x128": (32, 126)},
        translation_shapes={"1x32->32": (1, 30, 32), "8x32->32": (8, 30, 32)},
        encoder_engines=("fp32", "int8"),
        translation_engines=(("fp32", False), ("int8", False)),
        ctranslate2=True,
        reference="pytorch-fp32",
    ),
    # Saturation wants batches of 256 texts of 128 tokens, past the CPU defaults of the batcher.
    "cuda": Profile(
        device="cuda",
        variants=("fp16", "fp32"),
        encoder_shapes={"1x32": (1, 30), "32x128": (32, 126), "256x128": (256, 126)},
        translation_shapes={"1x48->48": (1, 46, 48), "8x48->48": (8, 46, 48)},
        encoder_engines=("fp32", "fp16"),
        translation_engines=(("fp32", False), ("fp16", False), ("fp16", True)),
        ctranslate2=False,
        reference="pytorch-fp16",
        batching={"max_batch_size": 256, "max_batch_tokens": 256 * 128},
    ),
}


@dataclass(frozen=True)
class Settings:
    work: Path  # checkpoints/ and exports/
    out: Path
    models: tuple[str, ...] = tuple(MODELS)
    variants: tuple[str, ...] = ("fp32", "int8")
    seconds: float = 10.0  # per load point
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    shape_concurrency: tuple[int, ...] = (1, 2)  # the fixed shapes: 1 for latency, 2 to overlap requests
    poisson: tuple[float, ...] = (0.5, 0.8)  # fractions of the best closed-loop request rate
    repeats: int = 5  # baseline timings: median of these
    warmup: int = 5
    baselines: bool = True
    size: str = "tiny"
    triton: bool = False  # also run the gateway with its models on a local tritonserver (Python flavor)
    device: str = "cpu"  # cpu or cuda: the gateway's device, the baselines' and the profile's

    @property
    def profile(self) -> Profile:
        return PROFILES[self.device]
