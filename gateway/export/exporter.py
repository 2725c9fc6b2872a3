"""`pgw export`: a Hugging Face checkpoint -> ONNX variants, tokenizer, manifest with accuracy reports."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from transformers import PreTrainedTokenizerFast

from gateway import __version__
from gateway.backends.onnxruntime import tensor_specs
from gateway.errors import ExportError, InvalidInput
from gateway.export import accuracy, loaders
from gateway.export import onnx as onnx_export
from gateway.export.demo import read_demo_info
from gateway.export.seq2seq import export_translation
from gateway.export.variants import convert_fp16, in_own_process, onnx_size, quantize_int8
from gateway.languages import flores200_codes
from gateway.manifest import (
    VARIANTS,
    AccuracyReport,
    EmbeddingInfo,
    FillMaskInfo,
    Manifest,
    OnnxPart,
    Source,
    SpecialTokens,
    Task,
    TokenClassificationInfo,
    TranslationInfo,
    Variant,
    VariantName,
)

OnStep = Callable[[str], None]
_CPU, _CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# SaT thresholds as wtpsplit chooses them: `-sm` models are trained to be calibrated around 0.25.
SAT_THRESHOLD_SM, SAT_THRESHOLD, SAT_THRESHOLD_NO_LOOKAHEAD = 0.25, 0.025, 0.01


def sat_threshold(name: str) -> float:
    """A SaT model's default threshold by wtpsplit's rule, on its name (a hub id's or a directory's last
    part): "sm" anywhere in it 0.25, else "no-limited-lookahead" 0.01, else 0.025."""
    last = Path(name.rstrip("/\\")).name
    if "sm" in last:
        return SAT_THRESHOLD_SM
    return SAT_THRESHOLD_NO_LOOKAHEAD if "no-limited-lookahead" in last else SAT_THRESHOLD


@dataclass(frozen=True)
class ExportOptions:
    task: Task
    variants: tuple[VariantName, ...] = ("fp32", "int8")
    tokenizer: str | None = None  # a tokenizer directory or hub id, for checkpoints that ship none (SaT)
    bounds: accuracy.Bounds = field(default_factory=accuracy.Bounds)
    # None: enforce the bounds on real checkpoints, record the figures only on random-weight demo ones.
    enforce_bounds: bool | None = None
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise InvalidInput(f"--variants must be a comma-separated subset of {','.join(VARIANTS)}")

    def steps(self) -> list[str]:
        """The progress steps of an export, in order."""
        made = [f"make {v}" for v in self.variants if v != "fp32"]
        measured = [f"measure {v}" for v in self.variants]
        return ["load checkpoint", "export fp32", *made, *measured, "write manifest"]


def _part(path: Path, root: Path) -> OnnxPart:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=[_CPU])
    return OnnxPart(
        file=str(path.relative_to(root)),
        size_bytes=onnx_size(path),
        inputs=tensor_specs(sess.get_inputs()),
        outputs=tensor_specs(sess.get_outputs()),
    )


def _special_tokens(tokenizer: PreTrainedTokenizerFast) -> SpecialTokens:
    return SpecialTokens(
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        unk_id=tokenizer.unk_token_id,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        cls_id=tokenizer.cls_token_id,
        sep_id=tokenizer.sep_token_id,
        mask_id=tokenizer.mask_token_id,
        mask_token=tokenizer.mask_token if tokenizer.mask_token_id is not None else None,
    )


def _max_input_tokens(task: Task, tokenizer: PreTrainedTokenizerFast, config: dict[str, Any]) -> int:
    positions = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in ("xlm-roberta", "roberta", loaders.SAT_MODEL_TYPE):
        positions -= 2  # RoBERTa positions start after the padding index
    limit = int(tokenizer.model_max_length) if tokenizer.model_max_length < 1_000_000 else positions
    return min(limit, positions)


def _merged(details: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The parts' details as one: a value all parts share once, the others under `part.key`."""
    merged: dict[str, Any] = {}
    keys = {key for part in details.values() for key in part}
    for key in sorted(keys):
        values = {part: d[key] for part, d in details.items() if key in d}
        if len(set(map(repr, values.values()))) == 1 and len(values) == len(details):
            merged[key] = next(iter(values.values()))
        else:
            merged.update({f"{part}.{key}": value for part, value in values.items()})
    return merged


class _TaskExport:
    """What export does per task: the PyTorch model, its fp32 ONNX parts, the accuracy report, and the
    manifest's task section. Encoders share the defaults."""

    def load(self, checkpoint: loaders.Checkpoint) -> torch.nn.Module:
        raise NotImplementedError

    def export(self, run: _Exporter, target: Path) -> dict[str, Path]:
        raise NotImplementedError

    def report(self, run: _Exporter, parts: dict[str, Path], provider: str) -> AccuracyReport:
        raise NotImplementedError

    def info(self, run: _Exporter) -> dict[str, Any]:
        raise NotImplementedError

    def optimizer_family(self, config: dict[str, Any]) -> tuple[str, int, int]:
        """The ONNX Runtime transformer optimizer's model type, heads and hidden size (for fp16)."""
        heads = int(config.get("num_attention_heads", config.get("n_heads", 12)))
        hidden = int(config.get("hidden_size", config.get("dim", 768)))
        return "bert", heads, hidden


class _TokenClassification(_TaskExport):
    def load(self, checkpoint: loaders.Checkpoint) -> torch.nn.Module:
        return loaders.load_token_classifier(checkpoint)

    def export(self, run: _Exporter, target: Path) -> dict[str, Path]:
        vocab = int(run.checkpoint.config.get("vocab_size", len(run.tokenizer)))
        return {"model": onnx_export.export_token_classifier(run.torch_model, vocab, target / "model.onnx")}

    def report(self, run: _Exporter, parts: dict[str, Path], provider: str) -> AccuracyReport:
        threshold = run.default_threshold() if loaders.is_sat_config(run.checkpoint.config) else None
        return accuracy.token_classification_report(
            run.torch_model, parts["model"], run.tokenizer, threshold, run.bounds, provider, run.max_length
        )

    def info(self, run: _Exporter) -> dict[str, Any]:
        config = run.checkpoint.config
        sat = loaders.is_sat_config(config)
        labels = loaders.label_names(config)
        threshold = run.default_threshold() if sat else None
        info = TokenClassificationInfo(labels=labels, sat=sat, default_threshold=threshold)
        return {"token_classification": info}


class _Embedding(_TaskExport):
    def load(self, checkpoint: loaders.Checkpoint) -> torch.nn.Module:
        return onnx_export.EmbeddingGraph(loaders.load_encoder(checkpoint)).eval()

    def export(self, run: _Exporter, target: Path) -> dict[str, Path]:
        assert isinstance(run.torch_model, onnx_export.EmbeddingGraph)
        return {"model": onnx_export.export_embedding(run.torch_model.encoder, target / "model.onnx")}

    def report(self, run: _Exporter, parts: dict[str, Path], provider: str) -> AccuracyReport:
        return accuracy.embedding_report(
            run.torch_model, parts["model"], run.tokenizer, run.bounds, provider, run.max_length
        )

    def info(self, run: _Exporter) -> dict[str, Any]:
        config = run.checkpoint.config
        hidden = int(config.get("hidden_size", config.get("dim", 0)))
        return {"embedding": EmbeddingInfo(dimensions=hidden, outputs=dict(onnx_export.EMBEDDING_OUTPUTS))}


class _FillMask(_TaskExport):
    def load(self, checkpoint: loaders.Checkpoint) -> torch.nn.Module:
        return loaders.load_masked_lm(checkpoint)

    def export(self, run: _Exporter, target: Path) -> dict[str, Path]:
        return {"model": onnx_export.export_fill_mask(run.torch_model, target / "model.onnx")}

    def report(self, run: _Exporter, parts: dict[str, Path], provider: str) -> AccuracyReport:
        return accuracy.fill_mask_report(
            run.torch_model, parts["model"], run.tokenizer, run.bounds, provider, run.max_length
        )

    def info(self, run: _Exporter) -> dict[str, Any]:
        vocab = int(run.checkpoint.config["vocab_size"])
        top_k = min(onnx_export.FILL_MASK_TOP_K, vocab)
        return {"fill_mask": FillMaskInfo(vocab_size=vocab, max_top_k=top_k)}


class _Translation(_TaskExport):
    def load(self, checkpoint: loaders.Checkpoint) -> torch.nn.Module:
        return loaders.load_seq2seq(checkpoint)

    def export(self, run: _Exporter, target: Path) -> dict[str, Path]:
        return export_translation(run.torch_model, target)

    def report(self, run: _Exporter, parts: dict[str, Path], provider: str) -> AccuracyReport:
        return accuracy.translation_report(
            run.torch_model, parts, run.tokenizer, run.languages(), run.bounds, provider, run.max_length
        )

    def info(self, run: _Exporter) -> dict[str, Any]:
        config = run.checkpoint.config
        languages = run.languages()
        if not languages:
            raise ExportError("the tokenizer knows no FLORES-200 language code: not an NLLB-style tokenizer")
        heads = int(config["decoder_attention_heads"])
        token_ids = run.tokenizer.get_vocab()
        translation = TranslationInfo(
            languages=languages,
            language_token_ids={code: int(token_ids[code]) for code in languages},
            decoder_start_token_id=int(
                config.get("decoder_start_token_id") or run.tokenizer.eos_token_id or 2
            ),
            num_layers=int(config["decoder_layers"]),
            num_heads=heads,
            head_dim=int(config["d_model"]) // heads,
            max_new_tokens=run.options.max_new_tokens,
        )
        return {"translation": translation}

    def optimizer_family(self, config: dict[str, Any]) -> tuple[str, int, int]:
        return "bart", int(config["encoder_attention_heads"]), int(config["d_model"])


_TASKS: dict[Task, _TaskExport] = {
    "token-classification": _TokenClassification(),
    "embedding": _Embedding(),
    "fill-mask": _FillMask(),
    "translation": _Translation(),
}


class _Exporter:
    """One export run; each method is one step of ExportOptions.steps()."""

    def __init__(self, model: str | Path, out_dir: Path, options: ExportOptions, on_step: OnStep):
        self.options = options
        self.out = out_dir
        self.on_step = on_step
        self.on_step("load checkpoint")
        self.checkpoint = loaders.open_checkpoint(model)
        self.demo = read_demo_info(self.checkpoint.path)
        self.tokenizer = loaders.load_tokenizer(self.checkpoint, options.tokenizer)
        self.task = options.task
        self.max_length = _max_input_tokens(self.task, self.tokenizer, self.checkpoint.config)
        enforce = options.enforce_bounds if options.enforce_bounds is not None else self.demo is None
        self.bounds = options.bounds if enforce else None
        self.kind = _TASKS[self.task]
        # A PreTrainedModel, or a wrapper module with the same call signature as the exported graph.
        self.torch_model: Any = self.kind.load(self.checkpoint)

    # ------------------------------------------------------------------------------------------- files

    def _fp32_parts(self) -> dict[str, Path]:
        self.on_step("export fp32")
        target = self.out / "fp32"
        return self.kind.export(self, target)

    def _derive(self, name: VariantName, fp32: dict[str, Path]) -> tuple[dict[str, Path], dict[str, Any]]:
        self.on_step(f"make {name}")
        parts, details = {}, {}
        for part, source in fp32.items():
            target = self.out / name / source.name
            if name == "int8":
                details[part] = in_own_process(quantize_int8, source, target)
            else:
                family = self.kind.optimizer_family(self.checkpoint.config)
                details[part] = in_own_process(convert_fp16, source, target, *family)
            parts[part] = target
        return parts, _merged(details)

    # ---------------------------------------------------------------------------------------- accuracy

    def _measure(self, name: VariantName, parts: dict[str, Path]) -> AccuracyReport:
        self.on_step(f"measure {name}")
        provider = _CUDA if name == "fp16" and _CUDA in ort.get_available_providers() else _CPU
        try:
            return self._report(parts, provider)
        except Exception as exc:
            if name != "fp16" or provider == _CUDA:
                raise
            return AccuracyReport(
                probe_set=accuracy.PROBE_SET,
                provider=provider,
                metrics={},
                passed=False,
                note=f"not measured: no CUDAExecutionProvider, and the CPU provider cannot run it ({exc})",
            )

    def _report(self, parts: dict[str, Path], provider: str) -> AccuracyReport:
        return self.kind.report(self, parts, provider)

    # ---------------------------------------------------------------------------------------- metadata

    def default_threshold(self) -> float:
        """This SaT checkpoint's threshold (its demo's published name, for a demo)."""
        return sat_threshold(self.demo.mirrors if self.demo else self.checkpoint.name)

    def languages(self) -> list[str]:
        vocab = self.tokenizer.get_vocab()
        return [code for code in flores200_codes() if code in vocab]

    def _source(self) -> Source:
        config = self.checkpoint.config
        return Source(
            name=self.checkpoint.name,
            sha256=self.checkpoint.sha256,
            model_type=self.checkpoint.model_type,
            architectures=list(config.get("architectures") or []),
            random_weights=self.demo is not None,
            mirrors=self.demo.mirrors if self.demo else "",
        )

    # --------------------------------------------------------------------------------------------- run

    def run(self) -> Manifest:
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True)
        started = time.perf_counter()
        fp32 = self._fp32_parts()
        exporter = "torch.onnx"
        made: dict[str, tuple[dict[str, Path], dict[str, Any], float]] = {
            "fp32": (fp32, {"exporter": exporter}, time.perf_counter() - started)
        }
        for name in self.options.variants:
            if name != "fp32":
                begun = time.perf_counter()
                parts, details = self._derive(name, fp32)
                made[name] = (parts, details, time.perf_counter() - begun)
        variants: dict[str, Variant] = {}
        for name in self.options.variants:
            parts, details, seconds = made[name]
            report = self._measure(name, parts)
            variants[name] = Variant(
                name=name,
                device="cuda" if name == "fp16" else "cpu",
                parts={part: _part(path, self.out) for part, path in parts.items()},
                details=details,
                export_seconds=round(seconds, 2),
                accuracy=report,
            )
        if "fp32" not in self.options.variants:
            shutil.rmtree(self.out / "fp32")
        failed = {
            n: v.accuracy
            for n, v in variants.items()
            if v.accuracy and v.accuracy.metrics and not v.accuracy.passed
        }
        if failed:
            lines = [
                f"{name}: {metric}={report.metrics[metric]:.4g} (bound {bound})"
                for name, report in failed.items()
                for metric, bound in report.bounds.items()
            ]
            raise ExportError("variants outside their accuracy bounds: " + "; ".join(lines))
        self.on_step("write manifest")
        self.tokenizer.save_pretrained(self.out)
        manifest = Manifest(
            task=self.task,
            source=self._source(),
            exporter=f"polyglot-gateway {__version__}",
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            special_tokens=_special_tokens(self.tokenizer),
            max_input_tokens=self.max_length,
            variants=variants,
            **self.kind.info(self),
        )
        manifest.write(self.out)
        return manifest


def export_model(
    model: str | Path, out_dir: Path, options: ExportOptions, on_step: OnStep | None = None
) -> Manifest:
    """Export `model` (a directory or a cached hub id) for `options.task` into `out_dir` (replaced)."""
    return _Exporter(model, out_dir, options, on_step or (lambda _step: None)).run()
