"""fp16 and int8 variants of an fp32 ONNX graph.

- int8 (CPU): int8 weights per output channel; activations quantized at run time with one scale per row
  (per token). ONNX Runtime's dynamic quantization takes one activation scale per tensor, that is over the
  whole padded batch, so a text's answer depended on its neighbours; with a scale per row every row is
  computed from its own values alone, and int32 accumulation is exact, so a text gives the same bits in
  any batch. On CPUs without VNNI, u8 x s8 products can saturate the 16-bit accumulators of AVX2's
  vpmaddubsw, so weights use 7 bits there (`reduce_range`); with VNNI the full range is exact and faster.
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

import numpy as np
import onnx
import onnx.numpy_helper

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
    """int8 per-channel weights of MatMul/Gemm and per-row activations; returns the settings used."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = _total_bytes(source) >= _TWO_GB
    reduce_range = not cpu_has_vnni()
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(target.stem + ".per-tensor.onnx")
    quantize_dynamic(
        str(source),
        str(staged),
        per_channel=True,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm", "Attention"],
        use_external_data_format=large,
        extra_options={"MatMulConstBOnly": True},
    )
    model = onnx.load(str(staged))
    rows = per_row_activations(model)
    _remove_with_data(staged)
    _save(model, target, large)
    return {
        "method": "dynamic",
        "weights": "int8 per-channel",
        "activations": "uint8 per-row dynamic, symmetric (zero point 128)",
        "per_row_inputs": rows,
        "reduce_range": reduce_range,
        "cpu_vnni": cpu_has_vnni(),
    }


class _Graph:
    """Who produces and who consumes each value of a graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def only_consumer(self, value: str, op_type: str) -> onnx.NodeProto:
        users = self.consumers.get(value, [])
        if len(users) != 1 or users[0].op_type != op_type:
            raise ValueError(f"{value}: expected one {op_type} consumer, found {[u.op_type for u in users]}")
        return users[0]


def per_row_activations(model: onnx.ModelProto) -> int:
    """Rewrite a dynamically quantized graph (ONNX Runtime's `quantize_dynamic`, one activation scale per
    tensor) to one scale per row of each quantized input, in place; returns how many inputs it rewrote.

    Each DynamicQuantizeLinear becomes: scale = max(|x|) / 127 over the last axis (ReduceMax and ReduceMin,
    which only read x), x / scale quantized with zero point 128 (symmetric, in uint8 for the fast u8 x s8
    kernels: int8 x int8 MatMulInteger took 3-4x the time of fp32 on the full-size DistilBERT), and each
    MatMulInteger -> Cast -> Mul(scale x weight scale) becomes MatMulIntegerToFloat (the weight's column
    scales applied in the kernel) times the row scales. Measured on the full-size DistilBERT (2 cores,
    `bench/quantization.py`): 1.04-1.3x the time of one scale per tensor, at its accuracy.
    """
    graph = model.graph
    index = _Graph(graph)
    p = "pgw_per_row"
    constants: dict[str, np.ndarray] = {
        f"{p}/inverse_127": np.array(1 / 127, dtype=np.float32),
        f"{p}/tiny": np.array(1e-30, dtype=np.float32),
        f"{p}/one": np.array(1.0, dtype=np.float32),
        f"{p}/zero_point": np.array(128, dtype=np.uint8),
    }
    make = onnx.helper.make_node
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> the nodes it becomes (none: removed)
    rewritten = 0
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        x, (quantized, scale, zero_point) = node.input[0], node.output
        n = f"{node.name}/{p}"
        replaced[id(node)] = [
            make("ReduceMax", [x], [f"{n}/max"], axes=[-1], keepdims=1),
            make("ReduceMin", [x], [f"{n}/min"], axes=[-1], keepdims=1),
            make("Neg", [f"{n}/min"], [f"{n}/minus_min"]),
            make("Max", [f"{n}/max", f"{n}/minus_min", f"{p}/tiny"], [f"{n}/range"]),
            make("Mul", [f"{n}/range", f"{p}/inverse_127"], [scale]),  # [..., 1]
            make("Div", [x, scale], [f"{n}/scaled"]),
            make("QuantizeLinear", [f"{n}/scaled", f"{p}/one", f"{p}/zero_point"], [quantized]),
        ]
        for matmul in index.consumers.get(quantized, []):
            if matmul.op_type != "MatMulInteger" or list(matmul.input).index(zero_point) != 2:
                raise ValueError(f"{node.name}: its output feeds {matmul.op_type}, not a MatMulInteger")
            cast = index.only_consumer(matmul.output[0], "Cast")
            mul = index.only_consumer(cast.output[0], "Mul")
            product = next(i for i in mul.input if i != cast.output[0])
            scales = index.producer[product]  # Mul(activation scale, weight scale)
            if scales.op_type != "Mul" or scale not in scales.input:
                raise ValueError(f"{mul.name}: not the product of the activation and weight scales")
            weight_scale = next(i for i in scales.input if i != scale)
            weight_zero_point = matmul.input[3] if len(matmul.input) > 3 else ""
            name = matmul.output[0]
            replaced[id(matmul)] = [
                make(
                    "MatMulIntegerToFloat",
                    [
                        quantized,
                        matmul.input[1],
                        f"{p}/one",
                        weight_scale,
                        f"{p}/zero_point",
                        weight_zero_point,
                    ],
                    [f"{name}/{p}/float"],
                    domain="com.microsoft",
                ),
                make("Mul", [f"{name}/{p}/float", scale], [mul.output[0]]),
            ]
            replaced[id(cast)] = []
            replaced[id(mul)] = []
            if all(id(user) in replaced or user is mul for user in index.consumers[product]):
                replaced[id(scales)] = []
        rewritten += 1
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.extend(replaced.get(id(node), [node]))
    for number, node in enumerate(nodes):
        node.name = node.name or f"{p}/{node.op_type}_{number}"
    del graph.node[:]
    graph.node.extend(nodes)
    if rewritten:
        graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in constants.items())
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return rewritten


def _remove_with_data(path: Path) -> None:
    """An ONNX file and the external data files it names."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                (path.parent / entry.value).unlink(missing_ok=True)
    path.unlink()


def _save(model: onnx.ModelProto, target: Path, large: bool) -> None:
    if large:
        data = target.with_name(target.name + ".data")
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save(model, str(target), save_as_external_data=True, location=data.name)
    else:
        onnx.save(model, str(target))


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
