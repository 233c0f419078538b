"""The docs name real tests: every `tests/...py::test_name` they cite exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def test_every_cited_test_exists():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    cited = {
        (doc.name, m.group(1), m.group(2))
        for doc in docs
        for m in CITATION.finditer(doc.read_text())
    }
    assert len(cited) > 20, "docs/reliability.md cites its tests"
    missing = [
        f"{doc}: {path}::{name}"
        for doc, path, name in sorted(cited)
        if not (REPO / path).is_file()
        or not re.search(rf"^def {name}\(", (REPO / path).read_text(), re.MULTILINE)
    ]
    assert not missing, missing
