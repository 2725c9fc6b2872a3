"""Triton without a server: generated configs against Triton's own schema, the translation wire format, the
Python-backend runners against the in-process path, and the error mapping."""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from gateway.backends.onnxruntime import OnnxRuntimeBackend, OrtSettings
from gateway.backends.triton import map_error
from gateway.cli import app
from gateway.decoding.batch import StepParts
from gateway.decoding.engine import Engine
from gateway.decoding.search import Decoded, DecodingOptions, GenerationItem, SamplingOptions
from gateway.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded
from gateway.export.demo import DEMO_MODELS
from gateway.manifest import Manifest, Task
from gateway.triton.python_models import EncoderRunner, TranslationRunner, load_parts
from gateway.triton.repository import TritonOptions, render_config, render_model_py, write_repository
from gateway.triton.wire import (
    REQUEST_TENSORS,
    RESPONSE_TENSORS,
    pack_decoded,
    pack_items,
    unpack_decoded,
    unpack_items,
)

Exported = Callable[[Task], tuple[Path, Manifest]]
TASKS: tuple[Task, ...] = ("token-classification", "embedding", "fill-mask", "translation")
KIND = model_config_pb2.ModelInstanceGroup.Kind


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("flavor", ["onnxruntime", "python"])
def test_configs_parse_with_tritons_schema(exported: Exported, task: Task, flavor: str) -> None:
    _, manifest = exported(task)
    options = TritonOptions(flavor=flavor, instances=2, max_batch_size=16, max_queue_delay_us=1500)  # type: ignore[arg-type]
    for variant in manifest.variants.values():
        config = parse(render_config(f"m-{variant.name}", manifest, variant, options))
        assert config.name == f"m-{variant.name}"
        assert config.max_batch_size == 16
        assert config.dynamic_batching.max_queue_delay_microseconds == 1500
        assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
        group = config.instance_group[0]
        assert group.count == 2
        assert group.kind == (KIND.KIND_GPU if variant.name == "fp16" else KIND.KIND_CPU)
        names = [i.name for i in config.input]
        if task == "translation":
            assert config.backend == "python"
            assert not config.platform
            assert names == [t.name for t in REQUEST_TENSORS]
            assert [o.name for o in config.output] == [t.name for t in RESPONSE_TENSORS]
            assert [i.allow_ragged_batch for i in config.input] == [t.ragged for t in REQUEST_TENSORS]
            continue
        part = variant.parts["model"]
        assert names == [spec.name for spec in part.inputs]
        assert [o.name for o in config.output] == [spec.name for spec in part.outputs]
        for output, spec in zip(config.output, part.outputs, strict=True):
            assert list(output.dims) == [d if isinstance(d, int) else -1 for d in spec.shape[1:]]
        if flavor == "onnxruntime":
            assert config.platform == "onnxruntime_onnx"
            assert not config.backend
            assert config.default_model_filename == Path(part.file).name
            assert not any(i.allow_ragged_batch for i in config.input)  # ORT needs one shape per batch
        else:
            assert config.backend == "python"
            assert all(i.allow_ragged_batch for i in config.input)  # the model pads requests itself
            assert config.parameters["parts"].string_value == f"model={Path(part.file).name}"


def test_tensorrt_accelerator_only_on_gpu(exported: Exported) -> None:
    _, manifest = exported("embedding")
    options = TritonOptions(tensorrt=True)
    fp16 = parse(render_config("e", manifest, manifest.variants["fp16"], options))
    accelerators = fp16.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == ["tensorrt"]
    assert accelerators[0].parameters["precision_mode"] == "FP16"
    int8 = parse(render_config("e", manifest, manifest.variants["int8"], options))
    assert not int8.optimization.execution_accelerators.gpu_execution_accelerator
    forced = parse(render_config("e", manifest, manifest.variants["fp32"], TritonOptions(kind="gpu")))
    assert forced.instance_group[0].kind == KIND.KIND_GPU


def test_repository_layout(exported: Exported, tmp_path: Path) -> None:
    directory, manifest = exported("translation")
    written = write_repository(directory, tmp_path, TritonOptions(), name="nllb", variants=("int8",))
    assert [d.name for d in written] == ["nllb-int8"]
    version = tmp_path / "nllb-int8" / "1"
    for part in manifest.variants["int8"].parts.values():
        assert (version / Path(part.file).name).read_bytes() == (directory / part.file).read_bytes()
    assert "import TranslationModel as TritonPythonModel" in (version / "model.py").read_text()
    encoder_dir, _ = exported("embedding")
    write_repository(encoder_dir, tmp_path, TritonOptions(), name="emb", variants=("fp32",))
    assert (tmp_path / "emb-fp32" / "1" / "model.onnx").is_file()
    assert not (tmp_path / "emb-fp32" / "1" / "model.py").exists()  # the ONNX Runtime backend runs it
    with pytest.raises(InvalidInput, match="not exported"):
        write_repository(encoder_dir, tmp_path, TritonOptions(), variants=("fp8",))


def test_cli_writes_a_repository(exported: Exported, tmp_path: Path) -> None:
    directory, _ = exported("token-classification")
    result = CliRunner().invoke(
        app,
        ["triton", "repo", str(directory), str(tmp_path), "--variants", "int8", "--triton-flavor", "python"],
    )
    assert result.exit_code == 0, result.output
    config = parse((tmp_path / f"{directory.name}-int8" / "config.pbtxt").read_text())
    assert config.backend == "python"
    bad = CliRunner().invoke(app, ["triton", "repo", str(directory), str(tmp_path), "--triton-flavor", "tf"])
    assert bad.exit_code == 1
    assert "--triton-flavor must be one of" in bad.output


# ----------------------------------------------------------------------------------------- wire format


def test_translation_wire_format_round_trips() -> None:
    items = [
        GenerationItem(
            [5, 6, 7, 2], (2, 9), 12, DecodingOptions(beam_size=3, num_return=2, length_penalty=0.7), 0
        ),
        GenerationItem(
            [8, 2],
            (2, 10),
            5,
            DecodingOptions(num_return=2, sampling=SamplingOptions(0.7, 20, 0.9, seed=2**64 - 1)),
            3,
        ),
        GenerationItem([4, 4, 2], (2, 11), 7, DecodingOptions(early_stopping=True), 1),
    ]
    arrays = pack_items(items, pad_id=1)
    assert set(arrays) == {t.name for t in REQUEST_TENSORS}
    assert arrays["SOURCE_IDS"].shape == (3, 4)
    assert arrays["SOURCE_IDS"][1, 2] == 1
    assert unpack_items(arrays) == [
        GenerationItem(
            i.source,
            i.prefix,
            i.limit,
            DecodingOptions(**{**i.options.__dict__, "return_scores": False}),
            i.seed_offset,
        )
        for i in items
    ]
    decoded = [
        Decoded([[3, 4, 5], []], [-1.25, -2.5], [[-0.125, -0.25, -0.375], []]),
        Decoded([[7]], [-0.5], [[-0.5]]),
    ]
    packed = pack_decoded(decoded)
    assert set(packed) == {t.name for t in RESPONSE_TENSORS}
    assert unpack_decoded(packed) == decoded


# --------------------------------------------------------------------------------------------- runners


def test_encoder_runner_pads_requests_and_cuts_outputs_back(exported: Exported) -> None:
    directory, manifest = exported("fill-mask")
    backend = OnnxRuntimeBackend(
        directory / manifest.variants["fp32"].parts["model"].file, OrtSettings(), ThreadPoolExecutor(1)
    )
    runner = EncoderRunner(backend, pad_id=manifest.special_tokens.pad_id)
    rng = np.random.default_rng(0)
    requests = []
    for rows, length, masks in ((2, 9, 1), (1, 4, 2), (3, 6, 3)):
        ids = rng.integers(5, 100, size=(rows, length), dtype=np.int64)
        positions = np.sort(rng.choice(np.arange(1, length), size=(rows, masks)), axis=1).astype(np.int64)
        requests.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "positions": positions})
    together = runner.run(requests)
    for request, result in zip(requests, together, strict=True):
        alone = backend.run_sync(request)
        assert result.keys() == alone.keys()
        for name in alone:
            assert result[name].shape == alone[name].shape
            np.testing.assert_allclose(result[name], alone[name], rtol=1e-5, atol=1e-6)


def test_translation_runner_matches_the_in_process_loop(exported: Exported) -> None:
    directory, manifest = exported("translation")
    parts = load_parts(
        directory / "int8",
        ",".join(f"{k}={Path(v.file).name}" for k, v in manifest.variants["int8"].parts.items()),
        OrtSettings(),
    )
    eos, pad = manifest.special_tokens.eos_id, manifest.special_tokens.pad_id
    assert eos is not None
    lang = manifest.translation.language_token_ids if manifest.translation else {}
    start = manifest.translation.decoder_start_token_id if manifest.translation else 0
    first = [
        GenerationItem(
            [lang["eng_Latn"], 40, 41, 42, eos], (start, lang["fra_Latn"]), 6, DecodingOptions(), 0
        ),
        GenerationItem([lang["eng_Latn"], 50, eos], (start, lang["deu_Latn"]), 4, DecodingOptions(), 1),
    ]
    second = [
        GenerationItem(
            [lang["fra_Latn"], 60, 61, eos],
            (start, lang["eng_Latn"]),
            5,
            DecodingOptions(beam_size=3, num_return=2),
            0,
        )
    ]
    runner = TranslationRunner(dict(parts), eos, pad)
    results = [unpack_decoded(r) for r in runner.run([pack_items(first, pad), pack_items(second, pad)])]
    expected = []
    for items in (first, second):  # each request decoded alone, by a fresh engine
        engine = Engine("alone", StepParts.of(parts), eos, pad)
        future = engine.submit(items)
        engine.run_all()
        expected.append(future.result().decoded)
    for got, want in zip(results, expected, strict=True):
        assert [d.tokens for d in got] == [d.tokens for d in want]
        for g, w in zip(got, want, strict=True):
            # int8 quantizes activations with one scale per batch, so scores move with batch contents
            np.testing.assert_allclose(g.scores, w.scores, rtol=1e-3)
    assert len(results[1][0].tokens) == 2


# -------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        ("StatusCode.UNAVAILABLE", "Request for unknown model", ModelNotReady),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", ModelNotReady),
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", Overloaded),
        ("StatusCode.UNAVAILABLE", "Request timeout expired", Overloaded),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceeded),
        ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input", InvalidInput),
    ],
)
def test_triton_errors_map_to_our_statuses(status: str, message: str, kind: type[Exception]) -> None:
    error = map_error(InferenceServerException(message, status=status), "host:8001", "m-int8")
    assert type(error) is kind
    assert "host:8001" in str(error)
    assert "m-int8" in str(error)


@pytest.mark.parametrize(
    ("name", "task"),
    [(demo.name, demo.task) for demo in DEMO_MODELS],
)
def test_committed_model_repo_is_what_the_generator_writes(exported: Exported, name: str, task: Task) -> None:
    """model_repo/ holds the demo models' configs and model.py (`make model-repo`), not their weights."""
    _, manifest = exported(task)
    root = Path(__file__).parents[2] / "model_repo"
    for variant in ("fp32", "int8"):
        directory = root / f"{name}-{variant}"
        expected = render_config(
            directory.name, manifest, manifest.variants[variant], TritonOptions(flavor="python")
        )
        assert (directory / "config.pbtxt").read_text() == expected, f"{directory}: run `make model-repo`"
        assert (directory / "1" / "model.py").read_text() == render_model_py(manifest)


def test_the_stub_s_dlpack_destructor_noise_is_dropped_and_nothing_else() -> None:
    """Reproduces what Triton 2.51's stub does to the NumPy capsules it consumes (renames them), and checks
    that only NumPy's resulting complaint is dropped."""
    import ctypes
    import gc

    from gateway.triton.python_models import _quiet_dlpack_destructor

    seen: list[BaseException] = []
    hook = _quiet_dlpack_destructor(lambda unraisable: seen.append(unraisable.exc_value))
    previous, sys.unraisablehook = sys.unraisablehook, hook
    try:
        rename = ctypes.pythonapi.PyCapsule_SetName
        rename.argtypes = [ctypes.py_object, ctypes.c_char_p]
        capsule = np.arange(3).__dlpack__()
        name = ctypes.c_char_p(b"used_dltensor_versioned")  # kept alive while the capsule lives
        rename(capsule, name)
        del capsule
        gc.collect()
        assert seen == [], "the DLPack destructor's complaint reached the hook"

        class Noisy:
            def __del__(self) -> None:
                raise RuntimeError("a real problem")

        Noisy()
        gc.collect()
        assert [str(e) for e in seen] == ["a real problem"]
    finally:
        sys.unraisablehook = previous
