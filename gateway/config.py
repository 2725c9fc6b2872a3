"""Server settings: explicit and frozen. Read from a YAML file, `PGW_` environment variables and CLI flags
(flags win over the environment, which wins over the file). Nothing is read at import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from gateway.batcher import BatcherSettings
from gateway.documents.translate import DocumentLimits
from gateway.errors import InvalidInput
from gateway.tasks.base import TextLimits

Device = Literal["cpu", "cuda"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


CPU_PADDING_RATIO = 1.2


class BatchingConfig(_Frozen):
    max_batch_size: int = Field(32, ge=1)
    max_batch_tokens: int = Field(16384, ge=1)
    max_queue_delay_ms: float = Field(5.0, ge=0)
    max_queue_size: int = Field(1024, ge=1)
    # Batches in flight per model; default 1 in-process, 4 on Triton (which batches across them too).
    max_concurrent_batches: int | None = Field(None, ge=1)
    # Padded / real tokens allowed in a batch; 0: no limit. Default 1.2 for models on the CPU: on 2 cores
    # under mixed-length load, 8 callers got 84 req/s against 81 for one caller at 1.2, 70 at 1.5, 34 with
    # no limit (embedding int8, bench/results/2026-12-02-encoder-padding); 1.5 elsewhere (GPUs, Triton),
    # where padding costs less and no other figure was measured yet.
    max_padding_ratio: float | None = Field(None, ge=0)
    # Translation in-process: texts join and leave the decoding batch at every step (continuous), or a
    # batch decodes to its end before the next one forms (static, for comparison). The engine takes up to
    # max_batch_size rows (beams count), max_batch_tokens cached tokens, and max_queue_size waiting texts.
    scheduling: Literal["continuous", "static"] = "continuous"
    # Translation in-process: the decoder's cache as numpy arrays in host memory, or as ONNX Runtime values
    # on the model's device (only the log-probabilities come back each step); auto: ortvalue on a GPU,
    # numpy on the CPU, where it measured faster (bench/results/2026-12-02-kv-cache).
    kv_cache: Literal["auto", "numpy", "ortvalue"] = "auto"

    def settings(self, remote: bool = False, device: str = "cpu") -> BatcherSettings:
        values = self.model_dump(exclude={"scheduling", "kv_cache"})
        if values["max_concurrent_batches"] is None:
            values["max_concurrent_batches"] = 4 if remote else 1
        if values["max_padding_ratio"] is None:
            values["max_padding_ratio"] = CPU_PADDING_RATIO if device == "cpu" and not remote else 1.5
        return BatcherSettings(**values)


class LimitsConfig(_Frozen):
    max_texts: int = Field(256, ge=1)  # texts per request
    max_text_chars: int = Field(20000, ge=1)  # characters per text
    max_request_chars: int = Field(1_000_000, ge=1)  # characters of all texts of a request together
    max_new_tokens: int = Field(256, ge=1)  # translation, per text
    max_in_flight: int = Field(1024, ge=1)  # RPCs being served at once, all models together
    max_in_flight_per_model: int = Field(256, ge=1)  # requests of one model at once (a stream's each count)
    max_masks: int = Field(16, ge=1)  # FillMask: mask tokens per text
    max_reply_chars: int = Field(4_000_000, ge=1)  # FillMask: text its `sequence`s repeat, all together
    max_document_bytes: int = Field(1_000_000, ge=1)  # TranslateDocument: UTF-8 bytes of the document
    max_document_sentences: int = Field(20_000, ge=1)  # TranslateDocument: sentences and attribute values
    max_html_depth: int = Field(256, ge=1)  # TranslateDocument: how deep HTML elements may nest

    def text_limits(self) -> TextLimits:
        return TextLimits(
            max_texts=self.max_texts,
            max_chars=self.max_text_chars,
            max_request_chars=self.max_request_chars,
            max_in_flight=self.max_in_flight_per_model,
            max_masks=self.max_masks,
            max_reply_chars=self.max_reply_chars,
        )

    def document_limits(self) -> DocumentLimits:
        return DocumentLimits(self.max_document_bytes, self.max_document_sentences, self.max_html_depth)

    @property
    def max_message_bytes(self) -> int:
        """The largest request worth parsing: every character of a request at 4 bytes (UTF-8's most), or
        the largest document, and room for the rest of the message."""
        return max(4 * self.max_request_chars, self.max_document_bytes) + 64 * 1024

    @property
    def max_http_body_bytes(self) -> int:
        """The largest HTTP body worth reading: JSON may escape each character as \\uXXXX (6 bytes, 12 for
        one outside the BMP), and a file form carries its document."""
        return max(6 * self.max_request_chars, 2 * self.max_document_bytes) + 64 * 1024


class TlsConfig(_Frozen):
    """PEM files: the server's certificate chain and private key, and, for mutual TLS, the CA that client
    certificates must chain to. The metrics port serves HTTPS with the same files."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @field_validator("cert", "key", "client_ca")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"{value} is not a file")
        return None if value is None else value.expanduser()


def cache_dir() -> Path:
    """Where built demo models, bench builds and tritonserver state go: $XDG_CACHE_HOME/polyglot-gateway,
    ~/.cache/polyglot-gateway without it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "polyglot-gateway"


class TritonConfig(_Frozen):
    """The Triton servers that models with `backend: triton` run on."""

    endpoints: tuple[str, ...] = ("localhost:8001",)  # gRPC host:port of each; round-robin over ready ones
    health_interval_s: float = Field(1.0, gt=0)  # how often each endpoint's model readiness is checked
    timeout_s: float = Field(60.0, gt=0)  # per inference call


class ModelConfig(_Frozen):
    """One served model: a `pgw export` directory."""

    name: str
    path: Path
    variant: str | None = None  # default: int8 on CPU, fp16 on GPU
    backend: Literal["onnxruntime", "triton"] = "onnxruntime"
    device: Device | None = None  # default: the server's device
    default: bool = False  # the default model of its task
    batching: BatchingConfig | None = None  # default: the server's batching
    # backend triton: the model's name in Triton; default `<export directory name>-<variant>`, as
    # `pgw export --triton` names it
    triton_model: str | None = None
    max_in_flight: int | None = Field(None, ge=1)  # requests at once; default limits.max_in_flight_per_model
    # An encoder model's ONNX Runtime threads spin between runs instead of sleeping: faster small requests
    # (full-size DistilBERT int8, 1 text of 32 tokens, 2 cores: 6.7 -> 4.8 ms), but spinning threads take
    # the cores from every other session of the process. Default: on when it is the server's only model on
    # the CPU in-process, else off. Translation ignores it (its engine spins its decoder step only).
    spinning: bool | None = None


class ServerConfig(BaseSettings):
    """Everything `pgw serve` needs. Build with `ServerConfig.load`."""

    model_config = SettingsConfigDict(
        env_prefix="PGW_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    host: str = "0.0.0.0"
    port: int = Field(50051, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9464, ge=0, le=65535)  # 0 disables the metrics endpoint
    # HTTP/JSON (OpenAI-compatible embeddings, LibreTranslate-compatible API, a JSON route per rpc) on the
    # same host as gRPC; 0 turns it off
    http_port: int = Field(8080, ge=0, le=65535)
    device: Device = "cpu"
    intra_op_threads: int = Field(0, ge=0)  # ONNX Runtime threads per session; 0: one per physical core
    tensorrt: bool = False  # on cuda, try the TensorRT provider before CUDA
    models: tuple[ModelConfig, ...] = ()
    demo: bool = False  # build, export and serve the demo models
    demo_dir: Path = Field(default_factory=lambda: cache_dir() / "demo")
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    triton: TritonConfig = TritonConfig()
    # SIGTERM: health turns NOT_SERVING, requests are still taken for drain_seconds (so that load balancers
    # notice), then no new ones, and those accepted get grace_seconds to finish. SIGINT skips the drain.
    drain_seconds: float = Field(5.0, ge=0)
    grace_seconds: float = Field(10.0, ge=0)
    api_key: str | None = None  # when set, clients send `authorization: Bearer <key>`
    api_key_file: Path | None = None  # one key per line; re-read on SIGHUP
    tls: TlsConfig | None = None

    @field_validator("demo_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then `PGW_*` variables, then the YAML file (`model_config["yaml_file"]`, set by `load`)."""
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)

    @classmethod
    def load(cls, file: Path | None = None, **flags: Any) -> ServerConfig:
        """Settings from `file` (YAML), then `PGW_*` variables, then `flags` (None values are ignored)."""
        settings_cls = cls
        if file is not None:
            if not file.is_file():
                raise InvalidInput(f"config file {file} does not exist")
            # the file is the class's setting in pydantic-settings: a subclass per file, nothing shared
            config = SettingsConfigDict(
                **{**cls.model_config, "yaml_file": file, "yaml_file_encoding": "utf-8"}
            )
            settings_cls = type(cls.__name__, (cls,), {"model_config": config, "__module__": cls.__module__})
        try:
            return settings_cls(**{k: v for k, v in flags.items() if v is not None})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'config'}: {error['msg']}"
                for error in exc.errors()
            )
            raise InvalidInput(f"invalid settings: {problems}") from None
        except (yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:  # not YAML, or not a mapping
            raise InvalidInput(f"config file {file} must hold a mapping of settings: {exc}") from None
