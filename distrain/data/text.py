"""Text rows made ready to pack: the text field found (or the row classified as bad) and tokenized.
The same function runs in the training process, in DataLoader workers and in Ray actors; the order
and the packing are the plan's (``distrain.data.plan``)."""

from __future__ import annotations

import numpy as np
import torch

from distrain.data.plan import Doc, Prepared


def text_of(row: Doc, fmt: str, field: str) -> Prepared:
    """The row's text as ``units``, or the kind of bad row and why (``row``: a ``Doc`` or a ``Row``)."""
    field = "text" if fmt == "txt" else field
    if row.error is not None:
        return Prepared(None, "malformed", row.error)
    if field not in row.value:
        return Prepared(
            None, "missing_field", f"no field {field!r} (fields: {sorted(row.value)}); set data.text_field"
        )
    text = row.value[field]
    if not isinstance(text, str) or not text:
        return Prepared(None, "empty", f"field {field!r} is empty or not a string")
    return Prepared(text)


class TokenizeRows:
    """A row -> its token ids followed by the end-of-document id (or why it is unusable)."""

    def __init__(self, tokenizer, fmts: list[str], field: str):
        self.tok, self.fmts, self.field = tokenizer, fmts, field

    def __call__(self, doc: Doc) -> Prepared:
        p = text_of(doc, self.fmts[doc.src], self.field)
        if p.units is None:
            return p
        return Prepared(np.append(self.tok.encode(p.units), self.tok.eos_id))


def collate_text(samples) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.from_numpy(np.stack([np.asarray(s.data) for s in samples])),
        "data_errors": torch.from_numpy(np.sum([s.errors for s in samples], axis=0)),
    }
