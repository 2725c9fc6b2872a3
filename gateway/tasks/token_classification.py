"""Token classification (Classify) and SaT sentence segmentation (Segment) on one token-classifier export.

Classify labels every token (LABELS), or tags tokens and groups them into spans (BIO, BIOES). For an
`id2label` model the spans are entities; for a SaT model, whose one label marks a sentence end after the
token, the spans are sentences.

Segment follows wtpsplit's SaT algorithm: XLM-R tokens without special tokens, windows of at most 510 tokens
each wrapped in `<s>`/`</s>`, a stride between window starts, overlapping logits averaged, sigmoid, each
token's probability placed on its last character, a split after every character whose probability exceeds
the threshold; a sentence keeps the whitespace that follows it, so the sentences concatenate to the text.
Every newline in the input also ends a sentence, and keeps to it, so the sentences still concatenate to the
text. `wtpsplit_compat` answers `SaT.split`'s segments instead (its defaults: each newline is dropped and
splits where it stands, which can leave empty segments); `strip_whitespace` strips every sentence, as
`SaT.split(strip_whitespace=True)`. Empty and whitespace-only texts are not run, as wtpsplit does not run
them: "" has no sentences, "  " is one sentence, or none when stripped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from gateway.batcher import BatcherSettings, Observer, Timed
from gateway.errors import InvalidInput
from gateway.offload import off_loop
from gateway.runtime import LoadedModel
from gateway.tasks.base import DEFAULT_LIMITS, BatchedTask, TextLimits, Timing, Usage
from gateway.tokenization import Encoded, pad_batch

Format = Literal["labels", "bio", "bioes"]
LongInput = Literal["truncate", "chunk"]
ScoreKind = Literal["none", "logits", "probabilities"]
WINDOW = 510  # content tokens per window; <s> and </s> make 512
DEFAULT_STRIDE = 64  # tokens between window starts, as wtpsplit
MIN_STRIDE = 32  # each token is then in up to 16 windows: smaller strides cost more and gain nothing
SAT_LABEL, SENTENCE = "BOUNDARY", "SENTENCE"


@dataclass(frozen=True)
class ClassifyInput:
    texts: list[str]
    format: Format = "labels"
    scores: ScoreKind = "none"
    threshold: float | None = None
    long_input: LongInput = "truncate"  # chunk: the whole text, in overlapping windows
    deadline: float | None = None


class TokenLabel(NamedTuple):  # a tuple, not a dataclass: thousands per request, and 2.7x cheaper to make
    token: str  # the text the token covers
    start: int
    end: int
    label: str
    score: float
    scores: Sequence[float]  # per model label, when asked for; empty otherwise


@dataclass(frozen=True)
class Span:
    label: str
    start: int
    end: int
    text: str
    score: float


@dataclass(frozen=True)
class ClassifiedText:
    tokens: list[TokenLabel]
    spans: list[Span]
    truncated: bool


@dataclass(frozen=True)
class ClassifyOutput:
    results: list[ClassifiedText]
    labels: list[str]
    usage: Usage
    timing: Timing


@dataclass(frozen=True)
class SegmentInput:
    texts: list[str]
    threshold: float | None = None
    max_length: int = 0  # characters per sentence; 0: no limit
    stride: int = 0  # tokens between window starts; 0: DEFAULT_STRIDE
    return_probabilities: bool = False
    wtpsplit_compat: bool = False  # SaT.split's segments: newlines dropped, possibly empty segments
    strip_whitespace: bool = False  # strip every sentence (and drop what is left empty, except in compat)
    deadline: float | None = None


@dataclass(frozen=True)
class Sentence:
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class SegmentedText:
    sentences: list[Sentence]
    probabilities: list[float] | None


@dataclass(frozen=True)
class SegmentOutput:
    results: list[SegmentedText]
    threshold: float
    usage: Usage
    timing: Timing


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x.astype(np.float32))))


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=-1, keepdims=True))


def windows(length: int, stride: int, size: int = WINDOW) -> list[tuple[int, int]]:
    """(start, end) token ranges covering [0, length): starts `stride` apart, the last flush with the end."""
    spans = []
    for start in range(0, max(length, 1), stride):
        end = start + size
        if end >= length:
            spans.append((max(length - size, 0), length))
            break
        spans.append((start, end))
    return spans


@functools.cache
def _whitespace() -> np.ndarray:
    """The code points `str.isspace` accepts (all of them lie below U+3001)."""
    return np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def split_points(text: str, char_probs: np.ndarray, threshold: float, newlines: bool = True) -> list[int]:
    """Sentence ends (exclusive) after each character above the threshold and (with `newlines`) at each
    newline, each moved past the whitespace that follows; the last is the text's end. Linear in the text:
    every cut finds its end by one binary search."""
    points = code_points(text)
    above = char_probs > threshold
    cuts = np.flatnonzero(above | (points == ord("\n")) if newlines else above)
    solid = np.flatnonzero(~np.isin(points, _whitespace()))  # positions of non-space characters
    after = np.searchsorted(solid, cuts + 1)  # the first non-space character after each cut
    padded = np.append(solid, len(text))  # no such character: the end of the text
    ends = padded[after]
    found: list[int] = np.unique(ends).tolist()
    if not found or found[-1] != len(text):
        found.append(len(text))
    return found


def ranges(ends: list[int]) -> list[tuple[int, int]]:
    """The non-empty (start, end) ranges between consecutive ends, the first starting at 0."""
    return [(a, b) for a, b in zip([0, *ends[:-1]], ends, strict=True) if b > a]


def stripped(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each range without the whitespace (`str.isspace`) at its ends; the emptied ones dropped."""
    result = []
    for a, b in spans:
        piece = text[a:b]
        start = a + len(piece) - len(piece.lstrip())
        end = b - (len(piece) - len(piece.rstrip()))
        if end > start:
            result.append((start, end))
    return result


def wtpsplit_spans(text: str, char_probs: np.ndarray, threshold: float, strip: bool) -> list[tuple[int, int]]:
    """`SaT.split`'s segments, as ranges of the text: a split after each character above the threshold,
    moved past the whitespace that follows (`strip`: each piece stripped, the empty ones dropped); then each
    piece but the last loses one trailing newline, and every newline left splits its piece where it stands
    and is dropped (so "a\n\nb" gives "a", "", "b")."""
    pieces = ranges(split_points(text, char_probs, threshold, newlines=False))
    if strip:
        pieces = stripped(text, pieces)
    segments = []
    for number, (a, b) in enumerate(pieces):
        if number < len(pieces) - 1 and text[b - 1] == "\n":
            b -= 1
        start = a
        while (newline := text.find("\n", start, b)) >= 0:
            segments.append((start, newline))
            start = newline + 1
        segments.append((start, b))
    return segments


def limit_length(ends: list[int], char_probs: np.ndarray, max_length: int) -> list[int]:
    """Split sentences longer than `max_length` characters at their most likely boundary inside the first
    `max_length` characters (a hard cut when the model sees none), until every piece fits."""
    if max_length <= 0:
        return ends
    limited, start = [], 0
    for end in ends:
        while end - start > max_length:
            inside = char_probs[start : start + max_length - 1]
            best = int(np.argmax(inside[::-1])) if inside.size and inside.max() > 0 else -1
            cut = start + max_length if best < 0 else start + len(inside) - best
            limited.append(cut)
            start = cut
        limited.append(end)
        start = end
    return limited


class TokenClassificationModel(BatchedTask[list[int], np.ndarray]):
    """Classify and (for SaT models) Segment, from a `token-classification` export."""

    task = "token-classification"

    def __init__(
        self,
        model: LoadedModel,
        settings: BatcherSettings,
        observer: Observer | None = None,
        limits: TextLimits = DEFAULT_LIMITS,
    ) -> None:
        info = model.manifest.token_classification
        if info is None:
            raise InvalidInput(
                f"{model.name} is a {model.manifest.task} model, not a token-classification model"
            )
        self.info = info
        self.labels = [SAT_LABEL] if info.sat else list(info.labels)
        special = model.manifest.special_tokens
        bos = special.cls_id if special.cls_id is not None else special.bos_id
        eos = special.sep_id if special.sep_id is not None else special.eos_id
        if bos is None or eos is None:
            raise InvalidInput(f"{model.name}: the tokenizer has no start/end tokens to frame windows with")
        self.bos, self.eos = bos, eos
        super().__init__(model, settings, observer, limits)

    def _warm_up_items(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.model.tokenizer.encode_batch(texts)]

    async def _run(self, rows: list[list[int]]) -> list[np.ndarray]:
        input_ids, mask = pad_batch(rows, self.model.manifest.special_tokens.pad_id)
        logits = (await self.model.backend.run({"input_ids": input_ids, "attention_mask": mask}, ["logits"]))[
            "logits"
        ]
        return [logits[i, : len(row)].astype(np.float32) for i, row in enumerate(rows)]

    def _details(self) -> dict[str, Any]:
        return {"labels": list(self.info.labels)}

    def _threshold(self, threshold: float | None) -> float:
        value = threshold if threshold is not None else (self.info.default_threshold or 0.5)
        if not 0 < value < 1:
            raise InvalidInput(f"threshold: {value} must be between 0 and 1")
        return value

    # ------------------------------------------------------------------------------------------ classify

    async def classify(self, request: ClassifyInput) -> ClassifyOutput:
        self.limits.check(request.texts)
        threshold = self._threshold(request.threshold) if len(self.info.labels) == 1 else 0.5
        size = sum(map(len, request.texts))
        if request.long_input == "chunk":
            return await self._classify_whole(request, threshold, size)
        with self.serving(len(request.texts), request.deadline) as held:
            encoded = await off_loop(size, self.model.tokenizer.encode_batch, request.texts)
            timed = await self.batcher.submit_all(
                [(e.ids, len(e)) for e in encoded], request.deadline, reservation=held
            )
            results = await off_loop(
                size,
                lambda: [
                    self._classified(text, e, t.value, request, threshold)
                    for text, e, t in zip(request.texts, encoded, timed, strict=True)
                ],
            )
        return ClassifyOutput(results, self.labels, Usage(sum(len(e) for e in encoded)), Timing.of(timed))

    async def _classify_whole(self, request: ClassifyInput, threshold: float, size: int) -> ClassifyOutput:
        """Every token of every text: windows of the model's input size overlapping by half, run in the
        same batches; each token's logits from the window where it sits farthest from either edge."""
        width = self.model.tokenizer.max_length - 2  # content tokens; <s> and </s> frame each window
        stride = max(width // 2, 1)
        expected = sum(max(1, len(text) // (4 * stride)) for text in request.texts)
        with self.serving(len(request.texts), request.deadline, rows=expected) as held:
            encoded = await off_loop(
                size,
                self.model.tokenizer.encode_batch,
                request.texts,
                add_special_tokens=False,
                truncate=False,
            )
            plans = [windows(len(e), stride, width) if len(e) else [] for e in encoded]
            rows = [
                ([self.bos, *e.ids[a:b], self.eos], b - a + 2)
                for e, plan in zip(encoded, plans, strict=True)
                for a, b in plan
            ]
            timed = await self.batcher.submit_all(rows, request.deadline, reservation=held)
            results = await off_loop(size, self._stitched, request, threshold, encoded, plans, timed)
        tokens = sum(b - a + 2 for plan in plans for a, b in plan)
        return ClassifyOutput(results, self.labels, Usage(tokens), Timing.of(timed))

    def _stitched(
        self,
        request: ClassifyInput,
        threshold: float,
        encoded: list[Encoded],
        plans: list[list[tuple[int, int]]],
        timed: list[Timed[np.ndarray]],
    ) -> list[ClassifiedText]:
        results, cursor = [], 0
        for text, e, plan in zip(request.texts, encoded, plans, strict=True):
            outputs = [t.value[1:-1] for t in timed[cursor : cursor + len(plan)]]
            cursor += len(plan)
            logits = np.zeros((len(e), len(self.labels)), dtype=np.float32)
            margin = np.full(len(e), -1)
            for (a, b), window in zip(plan, outputs, strict=True):
                positions = np.arange(a, b)
                room = np.minimum(positions - a, b - 1 - positions)  # context on the thinner side
                better = room > margin[a:b]
                logits[a:b][better] = window[better]
                margin[a:b] = np.maximum(margin[a:b], room)
            results.append(self._classified(text, e, logits, request, threshold))
        return results

    def _classified(
        self, text: str, encoded: Encoded, logits: np.ndarray, request: ClassifyInput, threshold: float
    ) -> ClassifiedText:
        keep = [i for i, special in enumerate(encoded.special) if not special]
        logits = logits[keep]
        offsets = [encoded.offsets[i] for i in keep]
        # Per-token work stays in numpy until one .tolist() per column: this runs for every token served.
        if logits.shape[-1] == 1:
            probs = _sigmoid(logits[:, 0])
            positive = probs > threshold
            label = self.labels[0]
            names = [label if p else "O" for p in positive.tolist()]
            token_scores = np.where(positive, probs, 1 - probs)
            all_probs = probs[:, None]
        else:
            all_probs = _softmax(logits)
            best = all_probs.argmax(-1)
            names = [self.labels[b] for b in best.tolist()]
            token_scores = all_probs[np.arange(len(best)), best]
        spans = _sentence_spans(names) if self.info.sat else _entity_spans(names)
        tags = names if request.format == "labels" else _tags(len(names), spans, request.format)
        extra = {"none": None, "logits": logits, "probabilities": all_probs}[request.scores]
        score_list = token_scores.tolist()
        if extra is None:
            tokens = [
                TokenLabel(text[start:end], start, end, tag, score, ())
                for (start, end), tag, score in zip(offsets, tags, score_list, strict=True)
            ]
        else:
            rows = extra.tolist()
            tokens = [
                TokenLabel(text[start:end], start, end, tag, score, row)
                for (start, end), tag, score, row in zip(offsets, tags, score_list, rows, strict=True)
            ]
        span_list = (
            []
            if request.format == "labels"
            else [
                Span(
                    label,
                    offsets[a][0],
                    offsets[b][1],
                    text[offsets[a][0] : offsets[b][1]],
                    float(np.mean(token_scores[a : b + 1])),
                )
                for label, a, b in spans
            ]
        )
        return ClassifiedText(tokens, span_list, encoded.truncated)

    # ------------------------------------------------------------------------------------------- segment

    async def segment(self, request: SegmentInput) -> SegmentOutput:
        threshold, stride = self._segment_settings(request)
        size = sum(map(len, request.texts))
        # a window per text, and more for long ones (about 4 characters a token): the rows admission counts
        expected = sum(max(1, len(text) // (4 * stride)) for text in request.texts)
        with self.serving(len(request.texts), request.deadline, rows=expected) as held:
            encoded, plans = await off_loop(size, self._plan_segments, request, stride)
            bos, eos = self.bos, self.eos
            windows_ = [
                ([bos, *e.ids[a:b], eos], b - a + 2)
                for e, plan in zip(encoded, plans, strict=True)
                for a, b in plan
            ]
            timed = await self.batcher.submit_all(windows_, request.deadline, reservation=held)
            results = await off_loop(size, self._sentences, request, threshold, encoded, plans, timed)
        tokens = sum(b - a + 2 for plan in plans for a, b in plan)
        return SegmentOutput(results, threshold, Usage(tokens), Timing.of(timed))

    def _segment_settings(self, request: SegmentInput) -> tuple[float, int]:
        if not self.info.sat:
            raise InvalidInput(f"model: {self.model.name} is not a SaT segmentation model; use Classify")
        self.limits.check(request.texts)
        threshold = self._threshold(request.threshold)
        if request.max_length < 0:
            raise InvalidInput(f"max_length: {request.max_length} must be >= 0")
        if request.max_length and request.wtpsplit_compat:
            raise InvalidInput(
                "max_length: wtpsplit_compat answers SaT.split's segments, which have no length limit here; "
                "leave max_length at 0 or turn wtpsplit_compat off"
            )
        stride = request.stride or DEFAULT_STRIDE
        if not MIN_STRIDE <= stride <= WINDOW:
            raise InvalidInput(f"stride: {stride} must be between {MIN_STRIDE} and {WINDOW} tokens")
        return threshold, stride

    def _plan_segments(
        self, request: SegmentInput, stride: int
    ) -> tuple[list[Encoded], list[list[tuple[int, int]]]]:
        encoded = self.model.tokenizer.encode_batch(request.texts, add_special_tokens=False, truncate=False)
        return encoded, [
            windows(len(e), stride) if text and not text.isspace() else []  # nothing to split: not run
            for text, e in zip(request.texts, encoded, strict=True)
        ]

    def _sentences(
        self,
        request: SegmentInput,
        threshold: float,
        encoded: list[Encoded],
        plans: list[list[tuple[int, int]]],
        timed: list[Timed[np.ndarray]],
    ) -> list[SegmentedText]:
        results, cursor = [], 0
        for text, e, plan in zip(request.texts, encoded, plans, strict=True):
            window_logits = [t.value[1:-1, 0] for t in timed[cursor : cursor + len(plan)]]
            cursor += len(plan)
            char_probs = self._char_probabilities(text, e, plan, window_logits)
            if request.wtpsplit_compat:
                spans = wtpsplit_spans(text, char_probs, threshold, request.strip_whitespace)
            else:
                ends = limit_length(split_points(text, char_probs, threshold), char_probs, request.max_length)
                spans = ranges(ends)
                if request.strip_whitespace:
                    spans = stripped(text, spans)
            sentences = [Sentence(text[a:b], a, b) for a, b in spans]
            probabilities = char_probs.tolist() if request.return_probabilities else None
            results.append(SegmentedText(sentences, probabilities))
        return results

    @staticmethod
    def _char_probabilities(
        text: str, encoded: Encoded, plan: list[tuple[int, int]], window_logits: list[np.ndarray]
    ) -> np.ndarray:
        """Average the windows' logits per token, sigmoid, and place each on the token's last character;
        0 on every other character (and on every character of a text that was not run)."""
        if not plan:
            return np.zeros(len(text), dtype=np.float32)
        total = np.zeros(len(encoded), dtype=np.float32)
        counts = np.zeros(len(encoded), dtype=np.float32)
        for (a, b), logits in zip(plan, window_logits, strict=True):
            total[a:b] += logits
            counts[a:b] += 1
        probs = _sigmoid(total / np.maximum(counts, 1))
        char_probs = np.zeros(len(text), dtype=np.float32)
        if encoded.offsets:
            offsets = np.asarray(encoded.offsets, dtype=np.int64).reshape(-1, 2)
            real = np.flatnonzero(offsets[:, 1] > offsets[:, 0])
            last = offsets[real, 1] - 1
            # Tokens sharing a last character: the later token's probability wins.
            reversed_unique, first = np.unique(last[::-1], return_index=True)
            char_probs[reversed_unique] = probs[real[::-1][first]]
        return char_probs


def _sentence_spans(names: list[str]) -> list[tuple[str, int, int]]:
    """SaT: every token belongs to a sentence, and a sentence ends at a positive token."""
    if not names:
        return []
    ends = [index for index, name in enumerate(names) if name != "O"]
    if not ends or ends[-1] != len(names) - 1:
        ends.append(len(names) - 1)
    return [(SENTENCE, start, end) for start, end in zip([0, *(e + 1 for e in ends[:-1])], ends, strict=True)]


def _parse(label: str) -> tuple[str, str]:
    """(prefix, type) of a label: ("B", "PER") for "B-PER", ("", "PER") for "PER", ("O", "") for "O"."""
    if label == "O":
        return "O", ""
    if len(label) > 2 and label[1] in "-_" and label[0] in "BIESL U":
        return label[0], label[2:]
    return "", label


def _entity_spans(names: list[str]) -> list[tuple[str, int, int]]:
    """Entity spans (type, first token, last token) from per-token labels in any of the usual schemes."""
    spans: list[tuple[str, int, int]] = []
    current: tuple[str, int] | None = None
    for index, name in enumerate(names):
        prefix, kind = _parse(name)
        starts_new = prefix in ("B", "S", "U") or current is None or current[0] != kind
        if current is not None and (prefix == "O" or starts_new):
            spans.append((current[0], current[1], index - 1))
            current = None
        if prefix != "O" and current is None:
            current = (kind, index)
        if current is not None and prefix in ("E", "S", "L", "U"):
            spans.append((current[0], current[1], index))
            current = None
    if current is not None:
        spans.append((current[0], current[1], len(names) - 1))
    return spans


def _tags(count: int, spans: list[tuple[str, int, int]], scheme: Format) -> list[str]:
    tags = ["O"] * count
    for kind, first, last in spans:
        for index in range(first, last + 1):
            tags[index] = f"I-{kind}"
        tags[first] = f"B-{kind}"
        if scheme == "bioes":
            if first == last:
                tags[first] = f"S-{kind}"
            else:
                tags[last] = f"E-{kind}"
    return tags
