"""The demo-model factory: random-weight models of the served architectures, with real tokenizers.

No machine here reaches a model hub, so tests, demos and benchmarks use models built here: the same classes,
the same checkpoint layout and the same tokenizer types as the published checkpoints, with random weights.
`tiny` models build in seconds; `full` models have the published sizes (for speed work). Tokenizers are
trained with `tokenizers` on the multilingual sample text the package ships (see `train_tokenizers`).

`DEMO_MODELS` is the one table of the models made from them (what `pgw serve --demo`, the benchmark and the
tests serve). It imports no PyTorch: the builders import it (and transformers) when they run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from gateway.languages import flores200_codes
from gateway.manifest import Task
from gateway.samples import sample_sentences

if TYPE_CHECKING:
    import torch
    from transformers import (
        DistilBertTokenizerFast,
        NllbTokenizerFast,
        PreTrainedTokenizerFast,
        XLMRobertaTokenizerFast,
    )

Size = Literal["tiny", "full"]
DEMO_MARKER = "polyglot_demo.json"
SAT_DEMO, DISTILBERT_DEMO, NLLB_DEMO = "sat-demo", "distilbert-demo", "nllb-demo"
DEMO_NAMES = (SAT_DEMO, DISTILBERT_DEMO, NLLB_DEMO)


@dataclass(frozen=True)
class DemoModel:
    """A model served from a demo checkpoint: its served name, the checkpoint and the export task."""

    name: str
    checkpoint: str
    task: Task


DEMO_MODELS = (
    DemoModel("sat-demo", SAT_DEMO, "token-classification"),
    DemoModel("distilbert-demo", DISTILBERT_DEMO, "embedding"),
    DemoModel("distilbert-demo-fill-mask", DISTILBERT_DEMO, "fill-mask"),
    DemoModel("nllb-demo", NLLB_DEMO, "translation"),
)


def demo_for(task: Task) -> DemoModel:
    """The demo model that serves `task`."""
    return next(model for model in DEMO_MODELS if model.task == task)


@dataclass(frozen=True)
class DemoInfo:
    """Written next to a demo checkpoint as `polyglot_demo.json`: what it imitates and how it was made."""

    name: str
    size: str
    seed: int
    mirrors: str  # the published checkpoint whose architecture and tokenizer type it copies
    random_weights: bool = True


# Published sizes. Tiny sizes keep the structure (layers, heads, special tokens) and shrink the widths.
_SAT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "full": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 250002,
    },
}
_DISTILBERT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
    "full": {"dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072, "vocab_size": 119547},
}
_NLLB_SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
    },
    "full": {
        "d_model": 1024,
        "encoder_layers": 12,
        "decoder_layers": 12,
        "encoder_attention_heads": 16,
        "decoder_attention_heads": 16,
        "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096,
        "vocab_size": 256206,
    },
}
_TOKENIZER_VOCAB = {"xlmr": 3000, "wordpiece": 3000, "nllb": 3000}


def _training_text() -> list[str]:
    return [s.text for s in sample_sentences()]


def _metaspace_tokenizer(model: models.Model) -> Tokenizer:
    """SentencePiece-style pipeline: NFKC, collapsed spaces, `▁` marks word starts."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


def train_xlmr(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """An XLM-R-style Unigram tokenizer: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, ..., `<mask>` last."""
    tok = _metaspace_tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        max_piece_length=16,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return tok


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A cased multilingual WordPiece tokenizer like multilingual BERT's (no lowercasing, accents kept)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=False
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, continuing_subword_prefix="##", show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def train_nllb(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """An NLLB-style tokenizer: SentencePiece-like BPE, FLORES-200 codes as special tokens, `<mask>` last."""
    tok = _metaspace_tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([*flores200_codes(), "<mask>"])
    return tok


TRAINERS: dict[str, Callable[[Iterable[str], int], Tokenizer]] = {
    "xlmr": train_xlmr,
    "wordpiece": train_wordpiece,
    "nllb": train_nllb,
}


def train_tokenizers(out_dir: Path) -> dict[str, Path]:
    """Train the three demo tokenizers on the shipped sample text and write `<kind>.json` files.

    `tokenizers` breaks ties between equally frequent pieces in hash-map order, so two trainings of the same
    text can differ; the demo builds therefore load the tokenizers trained once and shipped in
    `gateway/data/tokenizers/` (made with `tools/train_demo_tokenizers.py`), which keeps them deterministic.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, train in TRAINERS.items():
        path = out_dir / f"{kind}.json"
        train(_training_text(), _TOKENIZER_VOCAB[kind]).save(str(path), pretty=True)
        written[kind] = path
    return written


def shipped_tokenizer(kind: str) -> Tokenizer:
    """A demo tokenizer trained on the sample text and shipped with the package."""
    text = resources.files("gateway.data").joinpath("tokenizers", f"{kind}.json").read_text(encoding="utf-8")
    return Tokenizer.from_str(text)


def xlmr_fast(tok: Tokenizer) -> XLMRobertaTokenizerFast:
    from transformers import XLMRobertaTokenizerFast

    return XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
    )


def wordpiece_fast(tok: Tokenizer) -> DistilBertTokenizerFast:
    from transformers import DistilBertTokenizerFast

    return DistilBertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=False,
        tokenize_chinese_chars=True,
        strip_accents=None,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def nllb_fast(tok: Tokenizer) -> NllbTokenizerFast:
    from transformers import NllbTokenizerFast

    return NllbTokenizerFast(
        tokenizer_object=tok,
        src_lang="eng_Latn",
        additional_special_tokens=list(flores200_codes()),
        model_max_length=1024,
    )


def _save_demo(
    out: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    info: DemoInfo,
    rewrite_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
    tokenizer.save_pretrained(out)
    if rewrite_config is not None:
        config_path = out / "config.json"
        config = rewrite_config(json.loads(config_path.read_text()))
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / DEMO_MARKER).write_text(json.dumps(asdict(info), indent=2) + "\n")
    return out


def _as_wtpsplit_sat(config: dict[str, Any]) -> dict[str, Any]:
    """Rewrite an XLM-R token-classifier config into the layout wtpsplit saves SaT checkpoints in."""
    config["model_type"] = "xlm-token"
    config["architectures"] = ["SubwordXLMForTokenClassification"]
    config["mixture_name"] = "xlm-token"
    config.setdefault("lookahead", None)
    config.setdefault("lookahead_split_layers", None)
    return config


def build_sat_demo(out: Path, size: Size, seed: int) -> Path:
    """`sat-demo`: a 1-label XLM-R token classifier saved as wtpsplit's `SubwordXLMForTokenClassification`."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification

    tokenizer = xlmr_fast(shipped_tokenizer("xlmr"))
    dims = {"vocab_size": len(tokenizer), **_SAT_SIZES[size]}
    config = XLMRobertaConfig(
        **dims,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = XLMRobertaForTokenClassification(config).eval()
    info = DemoInfo(SAT_DEMO, size, seed, mirrors="segment-any-text/sat-12l-sm")
    return _save_demo(out / SAT_DEMO, model, tokenizer, info, rewrite_config=_as_wtpsplit_sat)


def build_distilbert_demo(out: Path, size: Size, seed: int) -> Path:
    """`distilbert-demo`: a cased DistilBERT with its masked-LM head (embeddings and fill-mask)."""
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    tokenizer = wordpiece_fast(shipped_tokenizer("wordpiece"))
    dims = {"vocab_size": len(tokenizer), **_DISTILBERT_SIZES[size]}
    config = DistilBertConfig(**dims, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = DistilBertForMaskedLM(config).eval()
    info = DemoInfo(DISTILBERT_DEMO, size, seed, mirrors="distilbert-base-multilingual-cased")
    return _save_demo(out / DISTILBERT_DEMO, model, tokenizer, info)


def build_nllb_demo(out: Path, size: Size, seed: int) -> Path:
    """`nllb-demo`: an M2M100 encoder-decoder with an NLLB tokenizer that knows every FLORES-200 code."""
    import torch
    from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration

    tokenizer = nllb_fast(shipped_tokenizer("nllb"))
    dims = {"vocab_size": len(tokenizer), **_NLLB_SIZES[size]}
    config = M2M100Config(
        **dims,
        max_position_embeddings=1024,
        scale_embedding=True,
        activation_function="relu",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        max_length=200,
    )
    info = DemoInfo(NLLB_DEMO, size, seed, mirrors="facebook/nllb-200-distilled-600M")
    return _save_demo(out / NLLB_DEMO, model, tokenizer, info)


BUILDERS: dict[str, Callable[[Path, Size, int], Path]] = {
    SAT_DEMO: build_sat_demo,
    DISTILBERT_DEMO: build_distilbert_demo,
    NLLB_DEMO: build_nllb_demo,
}


def build_demo_models(
    out: Path, size: Size = "tiny", seed: int = 0, names: Iterable[str] = DEMO_NAMES
) -> dict[str, Path]:
    """Build the named demo checkpoints under `out`; returns name -> directory."""
    return {name: BUILDERS[name](out, size, seed) for name in names}


def read_demo_info(model_dir: Path) -> DemoInfo | None:
    """The demo marker of a checkpoint directory, or None for a real checkpoint."""
    marker = model_dir / DEMO_MARKER
    if not marker.is_file():
        return None
    return DemoInfo(**json.loads(marker.read_text()))
