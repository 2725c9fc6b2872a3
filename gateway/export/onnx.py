"""Export PyTorch models to fp32 ONNX graphs shaped for serving.

- Encoders are wrapped so that the graph ends where the server's work starts: token logits for token
  classification; pooled (mean and CLS) and L2-normalized vectors for embeddings, so only [batch, hidden]
  leaves the runtime; top-k probabilities at the requested positions for fill-mask, so the vocabulary
  projection runs on mask positions only.
- The translation model exports as the decoding engine runs it (`seq2seq.py`): an encoder, the decoder's
  cross-attention projections, and a decoder step with per-row positions and cache masks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch
from transformers import PreTrainedModel

EMBEDDING_OUTPUTS = {
    "mean": "embedding_mean",
    "cls": "embedding_cls",
    "mean_normalized": "embedding_mean_normalized",
    "cls_normalized": "embedding_cls_normalized",
}
FILL_MASK_TOP_K = 50
OPSET = 17  # encoders: the opset the ONNX Runtime fusions are written against
_TWO_GB = 2**31


class EmbeddingGraph(torch.nn.Module):
    """Encoder + mean and CLS pooling + L2 normalization: [batch, tokens] -> 4 x [batch, hidden]."""

    def __init__(self, encoder: PreTrainedModel):
        super().__init__()
        self.encoder = encoder
        self.width = int(encoder.config.hidden_size)  # a constant: the outputs keep a static width

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # The sum over tokens as a running sum read at the last real token, so that a text's vector does
        # not depend on its batch: ONNX Runtime's ReduceSum (and MatMul with the mask) add in an order that
        # depends on the padded length and the batch's shape (measured: 1.9e-5 and 3e-8 apart alone and in
        # a batch), CumSum adds one token after the other.
        running = (hidden * mask).cumsum(dim=1)
        positions = torch.arange(mask.shape[1], device=mask.device).view(1, -1)
        last = (attention_mask * positions).amax(dim=1).view(-1, 1, 1).expand(-1, 1, self.width)
        summed = running.gather(1, last).reshape(-1, self.width)
        mean = summed / mask.sum(dim=1).clamp(min=1e-9)
        cls = hidden[:, 0]
        return mean, cls, l2_normalize(mean), l2_normalize(cls)


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    norms: torch.Tensor = vectors.norm(dim=-1, keepdim=True)
    return vectors / norms.clamp(min=1e-12)


def masked_lm_parts(
    model: PreTrainedModel,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """Split a masked-LM model into (encoder -> hidden states, head -> vocabulary logits)."""
    parts: Any = model  # the head modules differ by family
    if hasattr(parts, "vocab_projector"):  # DistilBERT

        def distilbert_head(hidden: torch.Tensor) -> torch.Tensor:
            hidden = parts.activation(parts.vocab_transform(hidden))
            return parts.vocab_projector(parts.vocab_layer_norm(hidden))  # type: ignore[no-any-return]

        head: Callable[[torch.Tensor], torch.Tensor] = distilbert_head
    elif hasattr(parts, "lm_head"):  # RoBERTa, XLM-R
        head = parts.lm_head
    elif hasattr(parts, "cls"):  # BERT
        head = parts.cls
    else:
        raise NotImplementedError(f"no known masked-LM head on {type(model).__name__}")
    base = getattr(model, model.base_model_prefix)

    def encode(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return base(input_ids=input_ids, attention_mask=attention_mask)[0]  # type: ignore[no-any-return]

    return encode, head


class FillMaskGraph(torch.nn.Module):
    """Encoder, then the LM head on the gathered mask positions only, then softmax and top-k.

    positions: [batch, masks] token indices (pad with any valid index); returns top-k probabilities and
    token ids, each [batch, masks, k].
    """

    def __init__(self, model: PreTrainedModel, top_k: int = FILL_MASK_TOP_K):
        super().__init__()
        self.model = model
        self.encode, self.head = masked_lm_parts(model)
        self.top_k = min(top_k, int(model.config.vocab_size))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encode(input_ids, attention_mask)
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        logits = self.head(hidden.gather(1, index))
        probs, ids = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        return probs, ids


class TokenLogitsGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)  # type: ignore[no-any-return]


def _example_inputs(vocab_size: int, batch: int = 2, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, max(6, vocab_size), (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.int64)
    attention_mask[1, length // 2 :] = 0
    return input_ids, attention_mask


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _torch_export(
    graph: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on constant shapes
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    if _parameter_bytes(graph) >= _TWO_GB:
        model = onnx.load(str(path))
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + "_data")
    return path


_TOKEN_AXES = {0: "batch_size", 1: "sequence_length"}


def export_token_classifier(model: torch.nn.Module, vocab_size: int, path: Path) -> Path:
    """(input_ids, attention_mask) -> logits [batch, tokens, labels]."""
    return _torch_export(
        TokenLogitsGraph(model).eval(),
        _example_inputs(vocab_size),
        path,
        ["input_ids", "attention_mask"],
        ["logits"],
        {"input_ids": _TOKEN_AXES, "attention_mask": _TOKEN_AXES, "logits": _TOKEN_AXES},
    )


def export_embedding(encoder: PreTrainedModel, path: Path) -> Path:
    """(input_ids, attention_mask) -> pooled vectors, see EMBEDDING_OUTPUTS."""
    outputs = list(EMBEDDING_OUTPUTS.values())
    axes: dict[str, dict[int, str]] = {"input_ids": _TOKEN_AXES, "attention_mask": _TOKEN_AXES}
    axes |= {name: {0: "batch_size"} for name in outputs}
    return _torch_export(
        EmbeddingGraph(encoder).eval(),
        _example_inputs(int(encoder.config.vocab_size)),
        path,
        ["input_ids", "attention_mask"],
        outputs,
        axes,
    )


def export_fill_mask(model: PreTrainedModel, path: Path) -> Path:
    """(input_ids, attention_mask, positions) -> top-k (probabilities, token_ids) per position."""
    input_ids, attention_mask = _example_inputs(int(model.config.vocab_size))
    positions = torch.tensor([[1, 3], [2, 0]], dtype=torch.int64)
    mask_axes = {0: "batch_size", 1: "num_positions"}
    return _torch_export(
        FillMaskGraph(model).eval(),
        (input_ids, attention_mask, positions),
        path,
        ["input_ids", "attention_mask", "positions"],
        ["top_probabilities", "top_token_ids"],
        {
            "input_ids": _TOKEN_AXES,
            "attention_mask": _TOKEN_AXES,
            "positions": mask_axes,
            "top_probabilities": mask_axes,
            "top_token_ids": mask_axes,
        },
    )
