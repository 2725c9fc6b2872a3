"""The engines the gateway is compared with, run model-only on the same token ids in the bench process:
the plain transformers model in PyTorch (fp32; dynamic int8 with `quantize_dynamic` on Linear on CPU; fp16,
and for translation fp16 with a static cache, on GPU), ONNX Runtime on the exported graph without the
gateway, and CTranslate2 (int8, float32) for translation on CPU.

Each engine runs a batch and returns what it produced (on the host), so agreement can be measured as well
as time, and a GPU engine's time includes waiting for its kernels.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gateway.backends.onnxruntime import OnnxRuntimeBackend, OrtSettings
from gateway.decoding.batch import StepParts
from gateway.decoding.engine import Engine, EngineSettings
from gateway.decoding.search import DecodingOptions, GenerationItem
from gateway.manifest import Manifest
from gateway.runtime import part_settings
from gateway.tokenization import pad_batch

Batch = list[list[int]]  # token ids with special tokens, one row per text
Precision = Literal["fp32", "fp16", "int8"]  # int8: PyTorch dynamic quantization, CPU only


def threads() -> int:
    return os.cpu_count() or 1


def timed(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` runs after one warm-up run, and the last run's output."""
    output = run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        output = run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), output


# ------------------------------------------------------------------------------------------------ encoders


def _torch() -> Any:
    import torch

    torch.set_num_threads(threads())
    return torch


def _ort(device: str, spinning: bool = False) -> OrtSettings:
    return OrtSettings(device="cuda" if device.startswith("cuda") else "cpu", spinning=spinning)


def _prepared(model: Any, precision: Precision, device: str) -> Any:
    """The model in eval mode at `precision` on `device`."""
    torch = _torch()
    if precision == "int8":
        if device != "cpu":
            raise ValueError("PyTorch dynamic int8 runs on the CPU only")
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    elif precision == "fp16":
        model = model.half()
    return model.to(device).eval()


class TorchEncoder:
    """The transformers model as a FastAPI wrapper would run it (embedding: mean pooling and L2 norm)."""

    def __init__(
        self, checkpoint: Path, task: str, pad_id: int, precision: Precision = "fp32", device: str = "cpu"
    ) -> None:
        torch = _torch()
        from transformers import AutoModel, AutoModelForMaskedLM

        from gateway.export.loaders import load_token_classifier, open_checkpoint

        if task == "token-classification":
            model = load_token_classifier(open_checkpoint(checkpoint))
        elif task == "fill-mask":
            model = AutoModelForMaskedLM.from_pretrained(checkpoint, use_safetensors=True)
        else:
            model = AutoModel.from_pretrained(checkpoint, use_safetensors=True)
        self.model = _prepared(model, precision, device)
        self.task = task
        self.pad_id = pad_id
        self.device = device
        self.name = f"pytorch-{precision}"
        self._torch = torch

    def run(self, batch: Batch) -> np.ndarray:
        torch = self._torch
        ids, mask = pad_batch(batch, self.pad_id)
        with torch.inference_mode():
            input_ids = torch.from_numpy(ids).to(self.device)
            attention = torch.from_numpy(mask).to(self.device)
            out = self.model(input_ids=input_ids, attention_mask=attention)
            if self.task == "embedding":
                hidden = out.last_hidden_state
                weights = attention.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1)
                result = torch.nn.functional.normalize(pooled.float(), dim=-1)
            else:
                result = out.logits if hasattr(out, "logits") else out  # SaT's loader returns the logits
            return np.asarray(result.float().cpu().numpy())


class OrtEncoder:
    """The exported graph on ONNX Runtime, called directly: the gateway minus tokenization and gRPC."""

    def __init__(self, export_dir: Path, variant: str, device: str = "cpu") -> None:
        manifest = Manifest.read(export_dir)
        part = manifest.variants[variant].parts["model"]
        self.backend = OnnxRuntimeBackend(
            # ONNX Runtime's own defaults (threads spin), as a gateway serving this model alone runs it
            export_dir / part.file,
            _ort(device, spinning=True),
            ThreadPoolExecutor(1),
        )
        self.pad_id = manifest.special_tokens.pad_id
        self.input_names = [spec.name for spec in part.inputs]
        self.name = f"onnxruntime-{variant}"
        embedding = manifest.embedding
        self.outputs = [embedding.outputs["mean_normalized"]] if embedding else None

    def run(self, batch: Batch) -> np.ndarray:
        ids, mask = pad_batch(batch, self.pad_id)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "positions" in self.input_names:  # fill-mask: one position per text, its middle token
            inputs["positions"] = np.array([[len(row) // 2] for row in batch], dtype=np.int64)
        out = self.backend.run_sync(inputs, self.outputs)
        return next(iter(out.values()))


# --------------------------------------------------------------------------------------------- translation


class TorchTranslator:
    """transformers `generate()`: greedy, the target language forced, exactly `new_tokens` after it.
    `static_cache`: `cache_implementation="static"`, the fastest way transformers offers on a GPU (its first
    call compiles, which the warm-up run of `timed` absorbs)."""

    def __init__(
        self, checkpoint: Path, precision: Precision = "fp32", device: str = "cpu", static_cache: bool = False
    ) -> None:
        torch = _torch()
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint, use_safetensors=True)
        self.model = _prepared(model, precision, device)
        self.device = device
        self.static_cache = static_cache
        self.name = f"pytorch-{precision}{'-static' if static_cache else ''}"
        self._torch = torch

    def run(self, batch: Batch, target_id: int, new_tokens: int, pad_id: int) -> list[list[int]]:
        torch = self._torch
        ids, mask = pad_batch(batch, pad_id)
        extra = {"cache_implementation": "static"} if self.static_cache else {}
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.from_numpy(ids).to(self.device),
                attention_mask=torch.from_numpy(mask).to(self.device),
                forced_bos_token_id=target_id,
                max_new_tokens=new_tokens + 1,
                min_new_tokens=new_tokens + 1,
                num_beams=1,
                do_sample=False,
                **extra,
            )
        return [row[2:] for row in out.tolist()]  # after the decoder start and the language token


class OrtTranslator:
    """The gateway's decoding loop over the exported parts, in this process: no gRPC, no batcher."""

    def __init__(self, export_dir: Path, variant: str, device: str = "cpu") -> None:
        manifest = Manifest.read(export_dir)
        executor = ThreadPoolExecutor(1)
        parts = {
            name: OnnxRuntimeBackend(export_dir / spec.file, part_settings(_ort(device), name), executor)
            for name, spec in manifest.variants[variant].parts.items()
        }
        eos = manifest.special_tokens.eos_id
        assert eos is not None
        assert manifest.translation is not None
        settings = EngineSettings(max_batch_size=1 << 20, max_batch_tokens=1 << 40)
        self.engine = Engine("bench", StepParts.of(parts), eos, manifest.special_tokens.pad_id, settings)
        self.start = manifest.translation.decoder_start_token_id
        self.name = f"onnxruntime-{variant}"

    def run(self, batch: Batch, target_id: int, new_tokens: int, pad_id: int) -> list[list[int]]:
        items = [
            GenerationItem(row, (self.start, target_id), new_tokens, DecodingOptions(), i)
            for i, row in enumerate(batch)
        ]
        future = self.engine.submit(items)
        self.engine.run_all()
        return [d.tokens[0] for d in future.result().decoded]


def convert_ctranslate2(checkpoint: Path, out: Path) -> Path:
    """The checkpoint in CTranslate2's format (float32 weights; int8 is chosen when loading)."""
    if not (out / "model.bin").is_file():
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(checkpoint)).convert(str(out), force=True)
    return out


class CTranslate2Translator:
    def __init__(
        self, converted: Path, compute_type: str, vocabulary: Callable[[list[int]], list[str]]
    ) -> None:
        import ctranslate2

        self.translator = ctranslate2.Translator(
            str(converted), device="cpu", compute_type=compute_type, intra_threads=threads()
        )
        self.to_tokens = vocabulary
        self.name = f"ctranslate2-{'int8' if compute_type == 'int8' else 'fp32'}"

    def run(self, batch: Batch, target_id: int, new_tokens: int, pad_id: int) -> list[list[int]]:
        target = self.to_tokens([target_id])[0]
        results = self.translator.translate_batch(
            [self.to_tokens(row) for row in batch],
            target_prefix=[[target]] * len(batch),
            beam_size=1,
            max_decoding_length=new_tokens + 1,
            min_decoding_length=new_tokens + 1,
            return_scores=False,
        )
        return [r.hypotheses[0][1:] for r in results]  # tokens (strings) after the language token
