"""Regenerate the config reference page from the schema: ``python docs/gen_config_reference.py``.

Rewrites the block between the markers of docs/reference/config.md with ``distrain config
reference``'s output (``distrain.config.reference_markdown``); tests/test_docs.py fails while the page
is stale."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distrain.config import reference_markdown  # noqa: E402

PAGE = ROOT / "docs" / "reference" / "config.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def main() -> None:
    text = PAGE.read_text()
    head, tail = text[: text.index(START) + len(START)], text[text.index(END) :]
    PAGE.write_text(f"{head}\n{reference_markdown().strip()}\n{tail}")
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
