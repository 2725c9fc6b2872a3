"""fp16 and int8 variants of an fp32 ONNX graph.

- int8 (CPU): dynamic quantization, int8 weights per output channel, activations quantized at run time.
  On CPUs without VNNI, u8 x s8 products can saturate the 16-bit accumulators of AVX2's vpmaddubsw, so
  weights use 7 bits there (`reduce_range`); with VNNI the full range is exact and faster.
- fp16 (GPU): ONNX Runtime's transformer optimizer fuses attention and LayerNorm patterns, then the graph is
  converted to float16 keeping float32 inputs and outputs, so callers never see half precision.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import onnx

_TWO_GB = 2**31


@cache
def cpu_has_vnni() -> bool:
    """True when the CPU has AVX512-VNNI or AVX-VNNI (int8 dot products without saturation)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _total_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


Details = dict[str, str | int | float | bool]
_ISOLATE_FROM = 2**30


def in_own_process(function: Callable[..., Details], source: Path, *args: Any) -> Details:
    """Run a conversion of a graph over 1 GB in a fresh process, so that its peak memory is given back.

    Converting the full-size NLLB parts one after another in the exporter's process (which also holds the
    PyTorch model) reached 24 GB and was killed; each conversion alone stays near 10 GB.
    """
    if _total_bytes(source) < _ISOLATE_FROM:
        return function(source, *args)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, source, *args).result()


def quantize_int8(source: Path, target: Path) -> Details:
    """Dynamic per-channel int8 quantization of MatMul/Gemm weights; returns the settings used."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = not cpu_has_vnni()
    target.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(source),
        str(target),
        per_channel=True,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm", "Attention"],
        use_external_data_format=_total_bytes(source) >= _TWO_GB,
        extra_options={"MatMulConstBOnly": True},
    )
    return {
        "method": "dynamic",
        "weights": "int8 per-channel",
        "activations": "uint8 dynamic",
        "reduce_range": reduce_range,
        "cpu_vnni": cpu_has_vnni(),
    }


def convert_fp16(source: Path, target: Path, model_type: str, num_heads: int, hidden_size: int) -> Details:
    """Fuse with the ONNX Runtime transformer optimizer, then float16 with float32 inputs and outputs.

    model_type is the optimizer's family: "bert" for BERT/DistilBERT/XLM-R encoders, "bart" for the
    M2M100/NLLB encoder and decoders. Graphs over 2 GB skip the fusions and shape inference: on the
    full-size NLLB decoder they took more than 24 GB of memory (measured), while plain conversion takes 10.
    """
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.optimizer import optimize_model

    large = _total_bytes(source) >= _TWO_GB
    details: Details = {"io": "float32"}
    if large:
        model = OnnxModel(onnx.load(str(source)))
        model.convert_float_to_float16(keep_io_types=True, disable_shape_infer=True)
        details["optimizer"] = "skipped: graph over 2 GB"
    else:
        model = optimize_model(
            str(source),
            model_type=model_type,
            num_heads=num_heads,
            hidden_size=hidden_size,
            opt_level=0,  # the Python fusions only: no session (and no GPU) is needed to write the graph
            use_gpu=True,
        )
        fused = {op: count for op, count in model.get_fused_operator_statistics().items() if count}
        model.convert_float_to_float16(keep_io_types=True)
        details["optimizer"] = model_type
        details |= {f"fused_{op}": count for op, count in sorted(fused.items())}
    target.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(target), use_external_data_format=_total_bytes(source) // 2 >= _TWO_GB)
    return details


def onnx_size(path: Path) -> int:
    """Bytes of an ONNX file plus its external data."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum(os.path.getsize(path.parent / loc) for loc in locations)
