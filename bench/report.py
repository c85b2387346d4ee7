"""Writing a benchmark's results into its section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(begin: str, end: str, section: str, docs: Path = DOCS) -> None:
    """Replace the text between the ``begin`` and ``end`` markers (appended at the end if absent), so
    each benchmark rewrites only its own numbers."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    text = (
        docs.read_text()
        if docs.exists()
        else "# Benchmarks\n\nNumbers measured on the project's 2-core machines.\n"
    )
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.write_text(text)
    print(f"written to docs/{docs.name}")
