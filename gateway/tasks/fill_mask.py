"""Fill-mask: the LM head runs at the mask positions only, with softmax and top-k inside the graph.

Each text is one batcher item; a prediction's `sequence` is the text with the prediction in the mask's
place, joined to the word before it as the tokenizer's decoder joins pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.batcher import BatcherSettings, Observer, Timed
from gateway.errors import InvalidInput
from gateway.offload import off_loop
from gateway.runtime import LoadedModel
from gateway.tasks.base import DEFAULT_LIMITS, BatchedTask, TextLimits, Timing, Usage
from gateway.tokenization import Encoded, pad_batch


@dataclass(frozen=True)
class FillMaskInput:
    texts: list[str]
    top_k: int = 5
    deadline: float | None = None


@dataclass(frozen=True)
class TokenPrediction:
    token: str
    token_id: int
    score: float
    sequence: str  # the text with this mask replaced by the prediction


@dataclass(frozen=True)
class MaskPredictions:
    start: int
    end: int
    predictions: list[TokenPrediction]


@dataclass(frozen=True)
class FillMaskOutput:
    results: list[list[MaskPredictions]]  # per text, per mask
    mask_token: str
    usage: Usage
    timing: Timing


@dataclass(frozen=True)
class _MaskItem:
    encoded: Encoded
    positions: list[int]  # token indices of the mask tokens


class FillMaskModel(BatchedTask[_MaskItem, tuple[np.ndarray, np.ndarray]]):
    """Masked-token prediction from a `fill-mask` export."""

    task = "fill-mask"

    def __init__(
        self,
        model: LoadedModel,
        settings: BatcherSettings,
        observer: Observer | None = None,
        limits: TextLimits = DEFAULT_LIMITS,
    ) -> None:
        info, special = model.manifest.fill_mask, model.manifest.special_tokens
        if info is None or special.mask_id is None or special.mask_token is None:
            raise InvalidInput(f"{model.name} is a {model.manifest.task} model, not a fill-mask model")
        self.max_top_k = info.max_top_k
        self.mask_id, self.mask_token = special.mask_id, special.mask_token
        super().__init__(model, settings, observer, limits)

    def _items(self, request: FillMaskInput) -> list[_MaskItem]:
        texts = request.texts
        items = []
        repeated = 0  # characters the reply repeats: every prediction's `sequence` is its whole text
        for index, encoded in enumerate(self.model.tokenizer.encode_batch(texts)):
            positions = [p for p, token in enumerate(encoded.ids) if token == self.mask_id]
            if not positions:
                message = (
                    "has no mask token"
                    if self.mask_token not in texts[index]
                    else "lost its mask to truncation"
                )
                raise InvalidInput(
                    f"texts[{index}] {message}; mark the word to predict with {self.mask_token}"
                )
            if len(positions) > self.limits.max_masks:
                raise InvalidInput(
                    f"texts[{index}]: {len(positions)} masks exceed the limit of {self.limits.max_masks} "
                    "per text"
                )
            repeated += len(positions) * request.top_k * len(texts[index])
            items.append(_MaskItem(encoded, positions))
        if repeated > self.limits.max_reply_chars:
            raise InvalidInput(
                f"the reply would repeat {repeated} characters (each prediction's `sequence` is its whole "
                f"text), over the limit of {self.limits.max_reply_chars}; ask for fewer masks, a smaller "
                "top_k or shorter texts"
            )
        return items

    async def fill_mask(self, request: FillMaskInput) -> FillMaskOutput:
        self.limits.check(request.texts)
        if not 1 <= request.top_k <= self.max_top_k:
            raise InvalidInput(f"top_k: {request.top_k} is outside 1..{self.max_top_k}")
        size = sum(map(len, request.texts))
        with self.serving(len(request.texts), request.deadline) as held:
            items = await off_loop(size, self._items, request)
            timed = await self.batcher.submit_all(
                [(item, len(item.encoded)) for item in items], request.deadline, reservation=held
            )
            results = await off_loop(size * request.top_k, self._all_predictions, request, items, timed)
        return FillMaskOutput(
            results=results,
            mask_token=self.mask_token,
            usage=Usage(input_tokens=sum(len(item.encoded) for item in items)),
            timing=Timing.of(timed),
        )

    def _all_predictions(
        self,
        request: FillMaskInput,
        items: list[_MaskItem],
        timed: list[Timed[tuple[np.ndarray, np.ndarray]]],
    ) -> list[list[MaskPredictions]]:
        return [
            self._predictions(text, item, t.value, request.top_k)
            for text, item, t in zip(request.texts, items, timed, strict=True)
        ]

    def _predictions(
        self, text: str, item: _MaskItem, top: tuple[np.ndarray, np.ndarray], top_k: int
    ) -> list[MaskPredictions]:
        probs, ids = top
        masks = []
        for column, position in enumerate(item.positions):
            start, end = item.encoded.offsets[position]
            predictions = []
            scores, token_ids = probs[column, :top_k].tolist(), ids[column, :top_k].tolist()
            for score, token_id in zip(scores, token_ids, strict=True):
                token = self.model.tokenizer.decode([token_id], skip_special_tokens=False).strip()
                sequence = self._filled(text, item.encoded, position, token_id, token)
                predictions.append(TokenPrediction(token, token_id, score, sequence))
            masks.append(MaskPredictions(start, end, predictions))
        return masks

    def _filled(self, text: str, encoded: Encoded, position: int, token_id: int, token: str) -> str:
        """The text with the mask at `position` replaced by the prediction, joined to the token before it as
        the tokenizer's decoder joins them: a word piece that continues a word ("##ino" after "at") closes
        up to it ("atino"), a word of its own takes the mask's place (with the decoder's space when the mask
        touches the word before). The rest of the text is kept as sent."""
        start, end = encoded.offsets[position]
        mask = text[start:end]
        start += len(mask) - len(mask.lstrip())  # a mask token may own the whitespace around it
        end -= len(mask) - len(mask.rstrip())
        before = position - 1
        if before >= 0 and not encoded.special[before]:
            previous = encoded.ids[before]
            alone = self.model.tokenizer.decode([previous], skip_special_tokens=False)
            joined = self.model.tokenizer.decode([previous, token_id], skip_special_tokens=False)
            added = joined[len(alone) :] if joined.startswith(alone) else ""
            after = encoded.offsets[before][1]  # where the token before ends
            if added and not added[0].isspace():  # a piece of the word before
                return text[:after] + added + text[end:]
            if added and after == start:  # a word, and the text has no space before the mask: the decoder's
                return text[:start] + added + text[end:]
        return text[:start] + token + text[end:]

    def _warm_up_items(self, texts: list[str]) -> list[_MaskItem]:
        return [_MaskItem(e, [len(e) // 2]) for e in self.model.tokenizer.encode_batch(texts)]

    async def _run(self, items: list[_MaskItem]) -> list[tuple[np.ndarray, np.ndarray]]:
        pad_id = self.model.manifest.special_tokens.pad_id
        input_ids, attention_mask = pad_batch([i.encoded.ids for i in items], pad_id)
        width = max(len(i.positions) for i in items)
        positions = np.zeros((len(items), width), dtype=np.int64)
        for row, item in enumerate(items):
            positions[row, : len(item.positions)] = item.positions
        out = await self.model.backend.run(
            {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions},
            ["top_probabilities", "top_token_ids"],
        )
        return [
            (
                out["top_probabilities"][row, : len(item.positions)],
                out["top_token_ids"][row, : len(item.positions)],
            )
            for row, item in enumerate(items)
        ]
