"""Retrain the demo tokenizers in gateway/data/tokenizers/ from gateway/data/sample_text.tsv.

Run after editing the sample text, then rebuild any demo checkpoints. Training is not bit-reproducible
(tie order in `tokenizers`), which is why the results are committed rather than retrained at build time.
"""

from __future__ import annotations

from pathlib import Path

from gateway.export.demo import train_tokenizers

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "gateway" / "data" / "tokenizers"
    for kind, path in train_tokenizers(target).items():
        print(f"{kind}: {path}")
