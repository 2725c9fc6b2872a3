"""`manifest.json`: what `pgw export` wrote and what the server needs to serve it, without torch.

One manifest per exported model directory. It names the task, the source checkpoint (and its hash), the
tokenizer's special tokens, the limits, and per variant the ONNX parts with their inputs and outputs and the
accuracy report measured against the PyTorch fp32 model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"
# 2: translation exports hold encoder, cross_kv and decoder_step (the engine's graphs).
FORMAT_VERSION = 2

Task = Literal["token-classification", "embedding", "fill-mask", "translation"]
TASKS: tuple[Task, ...] = ("token-classification", "embedding", "fill-mask", "translation")
VariantName = Literal["fp32", "fp16", "int8"]
VARIANTS: tuple[VariantName, ...] = ("fp32", "fp16", "int8")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(_Frozen):
    name: str
    dtype: str  # ONNX element type, e.g. "float32", "int64"
    shape: list[int | str]  # symbolic dimensions by name


class OnnxPart(_Frozen):
    """One ONNX file: an encoder, a decoder, ..."""

    file: str  # relative to the export directory
    size_bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class AccuracyReport(_Frozen):
    """A variant measured against the PyTorch fp32 model on the fixed probe set."""

    reference: str = "pytorch-fp32"
    probe_set: str
    provider: str  # the ONNX Runtime provider that ran the variant
    metrics: dict[str, float]
    bounds: dict[str, float] = Field(default_factory=dict)  # metric -> bound it had to meet
    passed: bool
    note: str = ""


class Variant(_Frozen):
    name: VariantName
    device: Literal["cpu", "cuda"]  # where this variant is meant to run
    parts: dict[str, OnnxPart]  # "model" for encoders; "encoder", "decoder", "decoder_with_past"
    details: dict[str, str | int | float | bool] = Field(default_factory=dict)  # quantization settings, ...
    export_seconds: float = 0.0
    accuracy: AccuracyReport | None = None

    @property
    def size_bytes(self) -> int:
        return sum(part.size_bytes for part in self.parts.values())


class Source(_Frozen):
    name: str  # as given to `pgw export`
    sha256: str  # of config, weights and tokenizer files
    model_type: str
    architectures: list[str]
    random_weights: bool  # a demo checkpoint: outputs mean nothing
    mirrors: str = ""  # for demo checkpoints, the published checkpoint they imitate


class SpecialTokens(_Frozen):
    pad_id: int
    unk_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    mask_token: str | None = None


class TokenClassificationInfo(_Frozen):
    labels: list[str]
    sat: bool  # a SaT sentence-boundary model (wtpsplit's xlm-token)
    default_threshold: float | None = None  # SaT: 0.25 for `-sm` models, 0.025 otherwise


class EmbeddingInfo(_Frozen):
    dimensions: int
    # Output names per (pooling, normalized), all [batch, dimensions].
    outputs: dict[str, str]


class FillMaskInfo(_Frozen):
    vocab_size: int
    max_top_k: int


class TranslationInfo(_Frozen):
    languages: list[str]  # FLORES-200 codes the tokenizer knows
    language_token_ids: dict[str, int]
    decoder_start_token_id: int
    num_layers: int  # decoder layers: the number of past key/value pairs
    num_heads: int
    head_dim: int
    max_new_tokens: int


class Manifest(_Frozen):
    format_version: int = FORMAT_VERSION
    task: Task
    source: Source
    exporter: str  # "polyglot-gateway <version>"
    created_at: str
    tokenizer_file: str = "tokenizer.json"
    special_tokens: SpecialTokens
    max_input_tokens: int
    variants: dict[str, Variant]
    token_classification: TokenClassificationInfo | None = None
    embedding: EmbeddingInfo | None = None
    fill_mask: FillMaskInfo | None = None
    translation: TranslationInfo | None = None

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST_NAME
        return cls.model_validate_json(path.read_text(encoding="utf-8"))


def is_current(directory: Path) -> bool:
    """Whether `directory` holds an export of this format (older ones are made again where they are built
    on demand: the demo and benchmark caches)."""
    try:
        return Manifest.read(directory).format_version >= FORMAT_VERSION
    except (OSError, ValueError):
        return False
