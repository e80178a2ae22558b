"""Byte-level tokenizer for the tiny model.

Bytes are the vocabulary so that any text round-trips without a trained
vocabulary file (no downloads), and ids stay small enough for a tiny embedding.
"""

from __future__ import annotations

#: Ids 0..255 are the UTF-8 bytes themselves.
NUM_BYTES: int = 256
#: End-of-sequence id; the engine stops a request when the model samples it.
EOS_ID: int = 256
#: Embedding/logit width the model must use.
VOCAB_SIZE: int = 257


def encode(text: str) -> list[int]:
    """Text -> UTF-8 byte ids (no BOS/EOS added; the engine decides that)."""
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    """Byte ids -> text; special/out-of-range ids are skipped and broken UTF-8 is replaced,
    because a random model happily emits invalid byte sequences."""
    return bytes(i for i in ids if 0 <= i < NUM_BYTES).decode("utf-8", errors="replace")

