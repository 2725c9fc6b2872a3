"""Load Hugging Face checkpoints for export: local directories or the Hugging Face cache, safetensors only.

The same loaders serve the published checkpoints (`segment-any-text/sat-12l-sm`,
`distilbert-base-multilingual-cased`, `facebook/nllb-200-distilled-600M`) and the demo checkpoints: nothing
here knows whether a checkpoint is a demo. SaT checkpoints (`model_type: xlm-token`, wtpsplit's
`SubwordXLMForTokenClassification`) load into transformers' own `XLMRobertaForTokenClassification`, whose
weights they share name for name, so no remote code is ever run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForTokenClassification,
)

from gateway.errors import InvalidInput

SAT_MODEL_TYPE = "xlm-token"
# SaT checkpoints ship no tokenizer; wtpsplit pairs them with this one, cached under either name.
SAT_TOKENIZERS = ("FacebookAI/xlm-roberta-base", "xlm-roberta-base")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "sentencepiece.bpe.model", "vocab.txt")
_HASHED_SUFFIXES = (".json", ".safetensors", ".model", ".txt")


def resolve_checkpoint(name_or_path: str | Path, cache_dir: Path | None = None) -> Path:
    """A local directory as is, or a hub id (`org/name`) found in the Hugging Face cache (never fetched)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, ValueError) as exc:
        raise InvalidInput(
            f"model {name_or_path!r} is neither a directory nor in the Hugging Face cache; "
            "download it on a machine with hub access (huggingface-cli download) or pass a local directory"
        ) from exc


def _first_cached(names: tuple[str, ...]) -> Path:
    for name in names[:-1]:
        try:
            return resolve_checkpoint(name)
        except InvalidInput:
            continue
    return resolve_checkpoint(names[-1])


def read_config(model_dir: Path) -> dict[str, Any]:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise InvalidInput(f"{model_dir} has no config.json: not a Hugging Face model directory")
    result: dict[str, Any] = json.loads(config_path.read_text())
    return result


def checkpoint_sha256(model_dir: Path) -> str:
    """A hash over the checkpoint's config, weights and tokenizer files (names and contents, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in _HASHED_SUFFIXES):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _require_safetensors(model_dir: Path) -> None:
    if not any(model_dir.glob("*.safetensors")):
        raise InvalidInput(
            f"{model_dir} holds no .safetensors weights; pickled PyTorch weights are never loaded"
        )


def is_sat_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") == SAT_MODEL_TYPE


def sat_config(config: dict[str, Any]) -> XLMRobertaConfig:
    """The transformers XLM-R config equivalent to a wtpsplit SaT (`xlm-token`) config."""
    fields = {
        k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")
    }
    xlmr = XLMRobertaConfig(**fields)
    xlmr.architectures = ["XLMRobertaForTokenClassification"]
    return xlmr


class LookaheadTokenClassifier(torch.nn.Module):
    """An XLM-R token classifier whose attention sees at most `lookahead` tokens to the right per layer.

    This is SaT's limited lookahead: the config's `lookahead` is a budget over all layers (each layer gets
    `lookahead // num_layers`), and from layer `lookahead_split_layers` on, attention is causal.
    """

    def __init__(self, model: XLMRobertaForTokenClassification, lookahead: int, split_layers: int | None):
        super().__init__()
        layers = model.config.num_hidden_layers
        if lookahead % layers != 0:
            raise InvalidInput(f"SaT lookahead {lookahead} is not divisible by the {layers} layers")
        self.model = model
        self.config = model.config
        self.per_layer = lookahead // layers
        self.split_layers = split_layers

    def _mask(self, attention_mask: torch.Tensor, lookahead: int) -> torch.Tensor:
        length = attention_mask.shape[1]
        ahead = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril(lookahead)
        allowed = attention_mask[:, None, None, :].bool() & ahead[None, None]
        return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
            ~allowed, torch.finfo(torch.float32).min
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        roberta = self.model.roberta
        hidden = roberta.embeddings(input_ids=input_ids)
        mask = self._mask(attention_mask, self.per_layer)
        for index, layer in enumerate(roberta.encoder.layer):
            if self.split_layers is not None and index == self.split_layers:
                mask = self._mask(attention_mask, 0)
            out = layer(hidden, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out
        logits: torch.Tensor = self.model.classifier(hidden)
        return logits


@dataclass
class Checkpoint:
    """A resolved checkpoint directory and what export needs to know about it."""

    path: Path
    name: str
    config: dict[str, Any]
    sha256: str

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def open_checkpoint(name_or_path: str | Path) -> Checkpoint:
    path = resolve_checkpoint(name_or_path)
    config = read_config(path)
    return Checkpoint(path=path, name=str(name_or_path), config=config, sha256=checkpoint_sha256(path))


def load_tokenizer(checkpoint: Checkpoint, tokenizer: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The checkpoint's fast tokenizer; SaT checkpoints without one get `xlm-roberta-base`'s from the cache
    (`FacebookAI/xlm-roberta-base` or `xlm-roberta-base`)."""
    source: str | Path
    if tokenizer is not None:
        source = resolve_checkpoint(tokenizer)
    elif any((checkpoint.path / name).is_file() for name in _TOKENIZER_FILES):
        source = checkpoint.path
    elif is_sat_config(checkpoint.config):
        source = _first_cached(SAT_TOKENIZERS)
    else:
        raise InvalidInput(f"{checkpoint.path} has no tokenizer files; pass --tokenizer DIR")
    loaded = AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=False)
    if not isinstance(loaded, PreTrainedTokenizerFast):
        raise InvalidInput(f"the tokenizer at {source} has no fast (tokenizer.json) version")
    return loaded


# Which attention to trace. Measured here (transformers 4.57, torch 2.13): DistilBERT exported with SDPA
# attention lets ONNX Runtime's optimizer fuse Attention and EmbedLayerNormalization, while its eager
# attention (masked Where pattern) fuses neither; XLM-R fuses Attention either way. The encoder-decoder
# keeps eager attention, which exports the decoder's causal mask explicitly.
ENCODER_ATTENTION, SEQ2SEQ_ATTENTION = "sdpa", "eager"


def _from_pretrained(
    auto: Any,
    checkpoint: Checkpoint,
    config: PretrainedConfig | None = None,
    attention: str = ENCODER_ATTENTION,
) -> Any:
    _require_safetensors(checkpoint.path)
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "trust_remote_code": False,
        "attn_implementation": attention,
        "dtype": torch.float32,
    }
    if config is not None:
        kwargs["config"] = config
    model = auto.from_pretrained(checkpoint.path, **kwargs)
    return model.eval()


def load_token_classifier(checkpoint: Checkpoint) -> torch.nn.Module:
    """A token classifier returning logits [batch, tokens, labels] from (input_ids, attention_mask)."""
    if is_sat_config(checkpoint.config):
        model = _from_pretrained(XLMRobertaForTokenClassification, checkpoint, sat_config(checkpoint.config))
        lookahead = checkpoint.config.get("lookahead")
        if lookahead is not None:
            return LookaheadTokenClassifier(
                model, int(lookahead), checkpoint.config.get("lookahead_split_layers")
            )
        return _LogitsOnly(model)
    return _LogitsOnly(_from_pretrained(AutoModelForTokenClassification, checkpoint))


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits


def load_encoder(checkpoint: Checkpoint) -> PreTrainedModel:
    """The base encoder (no head) of a checkpoint, e.g. DistilBERT under a masked-LM head."""
    config = sat_config(checkpoint.config) if is_sat_config(checkpoint.config) else None
    model: PreTrainedModel = _from_pretrained(AutoModel, checkpoint, config)
    return model


def load_masked_lm(checkpoint: Checkpoint) -> PreTrainedModel:
    model: PreTrainedModel = _from_pretrained(AutoModelForMaskedLM, checkpoint)
    return model


def load_seq2seq(checkpoint: Checkpoint) -> PreTrainedModel:
    model: PreTrainedModel = _from_pretrained(AutoModelForSeq2SeqLM, checkpoint, attention=SEQ2SEQ_ATTENTION)
    return model


def label_names(config: PretrainedConfig | dict[str, Any]) -> list[str]:
    """`id2label` as a list in id order."""
    id2label = config.get("id2label") if isinstance(config, dict) else config.id2label
    if not id2label:
        num = config.get("num_labels", 1) if isinstance(config, dict) else config.num_labels
        return [f"LABEL_{i}" for i in range(int(num))]
    return [str(id2label[key]) for key in sorted(id2label, key=lambda k: int(k))]
