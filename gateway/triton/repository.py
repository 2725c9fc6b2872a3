"""`pgw export … --triton DIR`: a `pgw export` directory -> Triton model directories, one per variant.

Two flavors:
- "onnxruntime": encoders run on Triton's ONNX Runtime backend (`platform: "onnxruntime_onnx"`) with its
  dynamic batcher, instance groups and, for fp16 on GPU, the CUDA provider or the TensorRT accelerator.
  Translation is always a Python-backend model: its decoding loop is ours, not a single graph.
- "python": every model is a Python-backend model running ONNX Runtime in Triton's Python stub, for Triton
  builds without the ONNX Runtime backend (such as the one in the `nvidia-pytriton` wheel). Its inputs are
  ragged: the model pads the requests Triton batches together and cuts the outputs back per request.

Each model directory holds `config.pbtxt` and `1/` with the variant's ONNX files (hard links where the file
system allows) and, for Python models, a `model.py` that imports its class from this package. The model
name is `<name>-<variant>`, which is also what the gateway asks Triton for by default.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.errors import InvalidInput
from gateway.manifest import MANIFEST_NAME, Manifest, TensorSpec, Variant
from gateway.triton.wire import REQUEST_TENSORS, RESPONSE_TENSORS, WireTensor

Flavor = Literal["onnxruntime", "python"]
Kind = Literal["auto", "cpu", "gpu"]
FLAVORS: tuple[Flavor, ...] = ("onnxruntime", "python")
VERSION = "1"
_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL",
}
# The Python model classes, by task; `model.py` re-exports one as TritonPythonModel.
_PYTHON_CLASSES = {"translation": "TranslationModel"}
_ENCODER_CLASS = "EncoderModel"


@dataclass(frozen=True)
class TritonOptions:
    flavor: Flavor = "onnxruntime"
    kind: Kind = "auto"  # auto: fp16 on GPU, fp32 and int8 on CPU
    instances: int = 1  # model instances per device
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    max_queue_size: int = 1024  # requests; more are refused (the gateway answers RESOURCE_EXHAUSTED)
    queue_timeout_us: int = 0  # 0: no timeout; else requests waiting longer are refused
    tensorrt: bool = False  # fp16 on GPU through the TensorRT accelerator (onnxruntime flavor)
    intra_op_threads: int = 0  # ONNX Runtime threads per instance; 0: its default

    def __post_init__(self) -> None:
        if self.flavor not in FLAVORS:
            raise InvalidInput(f"--triton-flavor must be one of {', '.join(FLAVORS)}, not {self.flavor!r}")
        if self.kind not in ("auto", "cpu", "gpu"):
            raise InvalidInput(f"--triton-kind must be auto, cpu or gpu, not {self.kind!r}")
        for field in ("instances", "max_batch_size", "max_queue_size"):
            if getattr(self, field) < 1:
                raise InvalidInput(f"triton {field} must be >= 1")


def model_name(name: str, variant: str) -> str:
    return f"{name}-{variant}"


def _dims(shape: list[int | str] | tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def _tensor(name: str, dtype: str, dims: str, ragged: bool = False) -> str:
    if dtype not in _TYPES:
        raise InvalidInput(f"tensor {name}: type {dtype} has no Triton equivalent")
    extra = " allow_ragged_batch: true" if ragged else ""
    return f'  {{ name: "{name}" data_type: {_TYPES[dtype]} dims: {dims}{extra} }}'


def _spec_tensors(specs: list[TensorSpec], ragged: bool) -> list[str]:
    """ONNX specs minus their batch dimension."""
    return [_tensor(s.name, s.dtype, _dims(s.shape[1:]), ragged=ragged) for s in specs]


def _wire_tensors(tensors: tuple[WireTensor, ...]) -> list[str]:
    return [_tensor(t.name, t.dtype, _dims(t.dims), ragged=t.ragged) for t in tensors]


def _parameters(values: dict[str, str]) -> list[str]:
    return [f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items()]


def _kind(variant: Variant, options: TritonOptions) -> Literal["cpu", "gpu"]:
    if options.kind != "auto":
        return options.kind
    return "gpu" if variant.name == "fp16" else "cpu"


def _python_backend(manifest: Manifest, options: TritonOptions) -> bool:
    """Translation always runs on the Python backend (its decoding loop is ours); encoders in that flavor."""
    return options.flavor == "python" or manifest.task == "translation"


def render_config(name: str, manifest: Manifest, variant: Variant, options: TritonOptions) -> str:
    """The `config.pbtxt` of one variant (text format of Triton's ModelConfig)."""
    python = _python_backend(manifest, options)
    kind = _kind(variant, options)
    lines = [f'name: "{name}"']
    lines.append('backend: "python"' if python else 'platform: "onnxruntime_onnx"')
    lines.append(f"max_batch_size: {options.max_batch_size}")
    if manifest.task == "translation":
        inputs, outputs = _wire_tensors(REQUEST_TENSORS), _wire_tensors(RESPONSE_TENSORS)
    else:
        part = variant.parts["model"]
        inputs, outputs = _spec_tensors(part.inputs, ragged=python), _spec_tensors(part.outputs, False)
        if not python:
            lines.append(f'default_model_filename: "{Path(part.file).name}"')
    lines += ["input [", ",\n".join(inputs), "]", "output [", ",\n".join(outputs), "]"]
    policy = [
        f"    max_queue_size: {options.max_queue_size}",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {options.queue_timeout_us}",
        "    allow_timeout_override: true",
    ]
    lines += [
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "  default_queue_policy {",
        *policy,
        "  }",
        "}",
        "instance_group [",
        f"  {{ kind: {'KIND_GPU' if kind == 'gpu' else 'KIND_CPU'} count: {options.instances} }}",
        "]",
    ]
    parameters: dict[str, str] = {}
    if python:
        parameters["parts"] = ",".join(f"{p}={Path(s.file).name}" for p, s in variant.parts.items())
        parameters["pad_id"] = str(manifest.special_tokens.pad_id)
        if manifest.special_tokens.eos_id is not None:
            parameters["eos_id"] = str(manifest.special_tokens.eos_id)
        parameters["intra_op_threads"] = str(options.intra_op_threads)
    else:
        parameters["intra_op_thread_count"] = str(options.intra_op_threads)
        optimization = ["optimization {", "  graph { level: 1 }"]
        if kind == "gpu" and options.tensorrt:
            optimization += [
                "  execution_accelerators { gpu_execution_accelerator [ {",
                '    name: "tensorrt"',
                '    parameters { key: "precision_mode" value: "FP16" }',
                '    parameters { key: "max_workspace_size_bytes" value: "4294967296" }',
                '    parameters { key: "trt_engine_cache_enable" value: "1" }',
                "  } ] }",
            ]
        lines += [*optimization, "}"]
    lines += _parameters(parameters)
    return "\n".join(lines) + "\n"


def render_model_py(manifest: Manifest) -> str:
    cls = _PYTHON_CLASSES.get(manifest.task, _ENCODER_CLASS)
    return (
        f'"""Triton Python-backend model for a {manifest.task} export, written by `pgw export --triton`.\n\n'
        "The code lives in the polyglot-gateway package, which must be installed in the Python that runs\n"
        'Triton\'s stub (its environment\'s `bin` first on PATH when tritonserver starts)."""\n\n'
        f"from gateway.triton.python_models import {cls} as TritonPythonModel\n\n"
        '__all__ = ["TritonPythonModel"]\n'
    )


def _place(source: Path, target: Path) -> None:
    """Hard-link `source` at `target` when both are on one file system, else copy it."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_repository(
    export_dir: Path,
    repository: Path,
    options: TritonOptions,
    name: str | None = None,
    variants: tuple[str, ...] | None = None,
) -> list[Path]:
    """Write one Triton model directory per variant (replacing older ones); returns them."""
    if not (export_dir / MANIFEST_NAME).is_file():
        raise InvalidInput(f"{export_dir} has no {MANIFEST_NAME}: pass a directory written by `pgw export`")
    manifest = Manifest.read(export_dir)
    base = name or export_dir.name
    chosen = variants or tuple(manifest.variants)
    unknown = [v for v in chosen if v not in manifest.variants]
    if unknown:
        raise InvalidInput(
            f"variants {', '.join(unknown)} were not exported; this model has {', '.join(manifest.variants)}"
        )
    written = []
    for variant_name in chosen:
        variant = manifest.variants[variant_name]
        target = repository / model_name(base, variant_name)
        if target.exists():
            shutil.rmtree(target)
        version = target / VERSION
        version.mkdir(parents=True)
        # The variant's directory holds its parts and their external-data files.
        source_dirs = {(export_dir / part.file).parent for part in variant.parts.values()}
        for directory in sorted(source_dirs):
            for file in sorted(directory.iterdir()):
                if file.is_file():
                    _place(file, version / file.name)
        if _python_backend(manifest, options):
            (version / "model.py").write_text(render_model_py(manifest), encoding="utf-8")
        (target / "config.pbtxt").write_text(
            render_config(target.name, manifest, variant, options), encoding="utf-8"
        )
        written.append(target)
    return written
