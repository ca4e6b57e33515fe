"""Tokenizers: the built-in byte-level one, or a local Hugging Face tokenizer directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distrain.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; id 256 ends a document."""

    vocab_size = 257
    eos_id = 256
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer saved with ``save_pretrained`` in a local directory (nothing is downloaded)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        p = Path(path)
        if not p.is_dir():
            raise DataError(
                f"data.tokenizer: {path} is not a directory; use 'bytes' or a local tokenizer directory saved with save_pretrained"
            )
        try:
            self.tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - say which directory failed and why
            raise DataError(f"data.tokenizer: cannot load a tokenizer from {path}: {exc}") from None
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        if eos is None:
            raise DataError(
                f"data.tokenizer: the tokenizer in {path} has no eos_token (or sep_token) to end documents; set one and save it again"
            )
        self.eos_id = int(eos)
        self.vocab_size = len(self.tok)
        self.name = str(p)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)
