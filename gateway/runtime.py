"""Load a `pgw export` directory for serving: manifest, variant, backends and tokenizer."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.backends.base import Backend
from gateway.backends.onnxruntime import OnnxRuntimeBackend, OrtSettings
from gateway.errors import InvalidInput
from gateway.manifest import MANIFEST_NAME, Manifest, Variant
from gateway.tokenization import TextTokenizer

if TYPE_CHECKING:
    from gateway.backends.triton import TritonPool


ENCODER_PART = "model"  # an encoder model's one part; translation has "encoder" and the decoder parts


@dataclass
class LoadedModel:
    """An exported model ready to run: what the task models are built from. In-process, `parts` holds an
    ONNX Runtime session per ONNX part of the variant; on Triton, `remote` is the Triton model that runs
    the whole of it (an encoder, or translation's engine) and `parts` is empty."""

    name: str
    directory: Path
    manifest: Manifest
    variant: Variant
    parts: dict[str, Backend]
    tokenizer: TextTokenizer
    remote: Backend | None = None

    @property
    def backend(self) -> Backend:
        """What runs an encoder: its one ONNX part, or its Triton model."""
        return self.remote if self.remote is not None else self.parts[ENCODER_PART]

    @property
    def runner(self) -> Backend:
        """The backend that describes where the model runs (its first part, or its Triton model)."""
        return self.remote if self.remote is not None else next(iter(self.parts.values()))

    def _all(self) -> list[Backend]:
        return [*self.parts.values(), *([self.remote] if self.remote is not None else [])]

    @property
    def ready(self) -> bool:
        return all(part.ready for part in self._all())

    async def start(self) -> None:
        for part in self._all():
            await part.start()

    async def close(self) -> None:
        for part in self._all():
            await part.close()


def choose_variant(manifest: Manifest, device: str, requested: str | None = None) -> str:
    """The requested variant, else int8 on CPU and fp16 on GPU, else fp32."""
    if requested:
        if requested not in manifest.variants:
            raise InvalidInput(
                f"variant {requested!r} was not exported; this model has {', '.join(manifest.variants)}"
            )
        return requested
    preferred = ("fp16", "fp32") if device == "cuda" else ("int8", "fp32")
    for name in preferred:
        if name in manifest.variants:
            return name
    return next(iter(manifest.variants))


def read_manifest(directory: Path) -> Manifest:
    if not (directory / MANIFEST_NAME).is_file():
        raise InvalidInput(f"{directory} has no {MANIFEST_NAME}: pass a directory written by `pgw export`")
    return Manifest.read(directory)


def _tokenizer(directory: Path, manifest: Manifest) -> TextTokenizer:
    return TextTokenizer(
        directory / manifest.tokenizer_file, manifest.special_tokens, manifest.max_input_tokens
    )


def part_settings(settings: OrtSettings, part: str) -> OrtSettings:
    """An encoder model's session spins as `settings` says (ModelConfig.spinning). Of translation's parts
    only the decoder step spins: the engine runs it back to back on its own thread, and spinning threads of
    its other sessions would steal the cores from it (see OrtSettings.spinning)."""
    if part == ENCODER_PART:
        return settings
    return dataclasses.replace(settings, spinning=part == "decoder_step")


def load_model(
    name: str,
    directory: Path,
    settings: OrtSettings,
    variant: str | None = None,
    executor: ThreadPoolExecutor | None = None,
) -> LoadedModel:
    """Open every ONNX part of the chosen variant with ONNX Runtime."""
    manifest = read_manifest(directory)
    chosen = manifest.variants[choose_variant(manifest, settings.device, variant)]
    pool = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")
    parts: dict[str, Backend] = {
        part: OnnxRuntimeBackend(directory / spec.file, part_settings(settings, part), pool)
        for part, spec in chosen.parts.items()
    }
    return LoadedModel(name, directory, manifest, chosen, parts, _tokenizer(directory, manifest))


def load_triton_model(
    name: str, directory: Path, pool: TritonPool, variant: str | None, triton_model: str | None
) -> LoadedModel:
    """A model served by Triton: manifest and tokenizer from the export directory (its ONNX files are not
    opened here); the Triton model runs it whole."""
    from gateway.backends.triton import TritonBackend
    from gateway.triton.repository import model_name

    manifest = read_manifest(directory)
    chosen = manifest.variants[choose_variant(manifest, "cpu", variant)]
    remote = TritonBackend(pool, triton_model or model_name(directory.name, chosen.name))
    return LoadedModel(name, directory, manifest, chosen, {}, _tokenizer(directory, manifest), remote)
