"""The translation model as the decoding engine runs it: three ONNX graphs around an M2M100 checkpoint.

- `encoder`: (input_ids, attention_mask) -> last_hidden_state.
- `cross_kv`: encoder states -> every decoder layer's cross-attention keys and values, computed once per
  text when it joins a batch.
- `decoder_step`: one token per row with the row's own position and a self-attention mask over the cache
  slots, so that rows at different lengths (joined at different steps, left-padded in the cache) decode in
  one batch. The standard decoder-with-past export derives positions from the cache length, the same for
  every row, and takes no self-attention mask: it cannot do that.

`DecoderStep` re-states the M2M100 decoder layer by layer with the checkpoint's own modules (pre-LayerNorm
self-attention, cross-attention, feed-forward; scaled embeddings plus sinusoidal positions; final
LayerNorm and output projection); `tests/unit/export/test_seq2seq.py` holds it to transformers' forward
and `generate()`.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from gateway.export.onnx import _TWO_GB

SEQ2SEQ_PARTS = {
    "encoder": "encoder.onnx",
    "cross_kv": "cross_kv.onnx",
    "decoder_step": "decoder_step.onnx",
}
STEP_OPSET = 17


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, length, model] -> [batch, heads, length, head_dim]."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, slots] of 1 (attend) / 0 (ignore) -> [batch, 1, 1, slots] to add to attention scores."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class EncoderGraph(nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        checkpoint: Any = model  # transformers' annotations call get_encoder a Tensor
        self.encoder = checkpoint.get_encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]  # type: ignore[no-any-return]


class CrossKV(nn.Module):
    """Encoder states [batch, source, model] -> per layer cross keys and values [batch, heads, source,
    head]."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.layers = model.get_decoder().layers
        self.heads = int(model.config.decoder_attention_heads)

    def forward(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: list[torch.Tensor] = []
        for layer in self.layers:
            attention = layer.encoder_attn
            out.append(_heads(attention.k_proj(encoder_hidden_states), self.heads))
            out.append(_heads(attention.v_proj(encoder_hidden_states), self.heads))
        return tuple(out)


class DecoderStep(nn.Module):
    """One decoder step for a batch of rows, each with its own position and cache mask.

    input_ids [batch, 1]; positions [batch, 1] (the token's index in its row: 0 for the decoder start token);
    self_attention_mask [batch, slots + 1] (the cache slots, then the new token); encoder_attention_mask
    [batch, source]; then per layer past self keys and values [batch, heads, slots, head] and cross keys and
    values [batch, heads, source, head]. Returns log-probabilities [batch, vocab] and per layer the new
    token's self-attention key and value [batch, heads, 1, head], which the engine writes into its cache:
    the graph never copies the cache."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        decoder = model.get_decoder()
        self.decoder = decoder
        self.lm_head = model.get_output_embeddings()
        self.heads = int(model.config.decoder_attention_heads)
        positions = decoder.embed_positions
        self.position_offset = int(positions.padding_idx) + 1  # M2M100 counts positions after the pad index
        self.register_buffer("position_table", positions.weights.detach().clone(), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        self_attention_mask: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        *cache: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        decoder = self.decoder
        hidden = decoder.embed_tokens(input_ids)
        table: Any = self.position_table
        hidden = hidden + table[positions + self.position_offset].to(hidden.dtype)
        self_mask = _additive(self_attention_mask, hidden.dtype)
        cross_mask = _additive(encoder_attention_mask, hidden.dtype)
        presents: list[torch.Tensor] = []
        for index, layer in enumerate(decoder.layers):
            past_key, past_value, cross_key, cross_value = cache[4 * index : 4 * index + 4]
            residual = hidden
            x = layer.self_attn_layer_norm(hidden)
            attention = layer.self_attn
            query = _heads(attention.q_proj(x) * attention.scaling, self.heads)
            key = _heads(attention.k_proj(x), self.heads)  # [batch, heads, 1, head]: the new token's
            value = _heads(attention.v_proj(x), self.heads)
            presents += [key, value]
            attended = self._attend_with_new(query, past_key, past_value, key, value, self_mask)
            hidden = residual + attention.out_proj(attended)
            residual = hidden
            x = layer.encoder_attn_layer_norm(hidden)
            attention = layer.encoder_attn
            query = _heads(attention.q_proj(x) * attention.scaling, self.heads)
            hidden = residual + attention.out_proj(self._attend(query, cross_key, cross_value, cross_mask))
            residual = hidden
            x = layer.final_layer_norm(hidden)
            hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(x)))
        logits = self.lm_head(decoder.layer_norm(hidden))[:, 0].float()
        # Log-probabilities, not logits: everything downstream wants them (scores, beams; sampling is the
        # same from either, a constant per row apart), and the runtime computes them far faster than
        # Python would over a 256k-token vocabulary.
        return (torch.log_softmax(logits, dim=-1), *presents)

    @staticmethod
    def _attend_with_new(
        query: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attention over the cache slots and the new token without concatenating them: the cache is read
        where it lies, and only the new token's key and value leave the graph (the engine writes them into
        its cache). The same as attending over cat(past, new)."""
        scores = torch.cat(
            [torch.matmul(query, past_key.transpose(-1, -2)), (query * key).sum(-1, keepdim=True)], -1
        )
        weights = torch.softmax(scores + mask, dim=-1)
        slots = past_key.shape[2]
        out = torch.matmul(weights[..., :slots], past_value) + weights[..., slots:] * value
        batch, heads, length, width = out.shape
        return out.transpose(1, 2).reshape(batch, length, heads * width)

    @staticmethod
    def _attend(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        scores = torch.matmul(query, key.transpose(-1, -2)) + mask
        weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(weights, value)  # [batch, heads, 1, head]
        batch, heads, length, width = out.shape
        return out.transpose(1, 2).reshape(batch, length, heads * width)


def cache_names(layers: int) -> tuple[list[str], list[str], list[str]]:
    """(past inputs, cross inputs, new-token outputs) of the decoder step, in the graph's order per layer."""
    past = [f"past.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    cross = [f"cross.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    new = [f"new.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, cross, new


def _export(
    graph: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
) -> Path:
    """torch.onnx into a scratch directory, then one file at `path` (and beside it one `_data` file for
    graphs over protobuf's 2 GB limit, which torch writes as a file per tensor)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    # In eval mode before export: the exporter puts the wrapper back into the mode it found it in, and a
    # new module is in training mode, which would leave the checkpoint's modules with dropout on.
    graph.eval()
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = Path(scratch) / path.name
        torch.onnx.export(
            graph, args, str(first), input_names=inputs, output_names=outputs, dynamic_axes=axes,
            opset_version=STEP_OPSET, do_constant_folding=True, dynamo=False,
        )  # fmt: skip
        if sum(f.stat().st_size for f in Path(scratch).iterdir()) < _TWO_GB:
            shutil.move(str(first), path)
        else:
            model = onnx.load(str(first))
            onnx.save(model, str(path), save_as_external_data=True, location=path.name + "_data")
    return path


def export_translation(model: PreTrainedModel, out_dir: Path) -> dict[str, Path]:
    """The three graphs of SEQ2SEQ_PARTS in `out_dir`."""
    model = model.eval()
    config = model.config
    heads, width = int(config.decoder_attention_heads), int(config.d_model)
    head = width // heads
    layers = int(config.decoder_layers)
    batch, source, slots = 2, 5, 3
    input_ids = torch.full((batch, source), 5, dtype=torch.int64)
    attention_mask = torch.ones(batch, source, dtype=torch.int64)
    attention_mask[1, 3:] = 0
    paths = {part: out_dir / name for part, name in SEQ2SEQ_PARTS.items()}
    text = {0: "batch", 1: "source"}
    _export(
        EncoderGraph(model), (input_ids, attention_mask), paths["encoder"], ["input_ids", "attention_mask"],
        ["last_hidden_state"], {"input_ids": text, "attention_mask": text, "last_hidden_state": text},
    )  # fmt: skip
    past, cross, present = cache_names(layers)
    hidden = torch.randn(batch, source, width, generator=torch.Generator().manual_seed(0))
    kv_axes = {0: "batch", 2: "source"}
    _export(
        CrossKV(model), (hidden,), paths["cross_kv"], ["encoder_hidden_states"], cross,
        {"encoder_hidden_states": text} | {name: kv_axes for name in cross},
    )  # fmt: skip
    cache: list[torch.Tensor] = []
    for _ in range(layers):
        cache += [torch.zeros(batch, heads, slots, head), torch.zeros(batch, heads, slots, head)]
        cache += [torch.zeros(batch, heads, source, head), torch.zeros(batch, heads, source, head)]
    inputs = ["input_ids", "positions", "self_attention_mask", "encoder_attention_mask"]
    ordered = [name for i in range(layers) for name in (*past[2 * i : 2 * i + 2], *cross[2 * i : 2 * i + 2])]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch"},
        "positions": {0: "batch"},
        "self_attention_mask": {0: "batch", 1: "slots_and_one"},
        "encoder_attention_mask": {0: "batch", 1: "source"},
        "logprobs": {0: "batch"},
    }
    axes |= {name: {0: "batch", 2: "slots"} for name in past}
    axes |= {name: kv_axes for name in cross}
    axes |= {name: {0: "batch"} for name in present}
    step_args = (
        torch.full((batch, 1), 5, dtype=torch.int64),
        torch.tensor([[3], [1]], dtype=torch.int64),
        torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.int64),
        attention_mask,
        *cache,
    )
    _export(
        DecoderStep(model),
        step_args,
        paths["decoder_step"],
        [*inputs, *ordered],
        ["logprobs", *present],
        axes,
    )
    return paths
