"""The docs name only what exists: every file or folder docs/architecture.md names is there."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def named_paths(doc: Path) -> set[str]:
    """Backticked tokens that look like a path: containing "/" or ending in a file suffix; placeholders (<, *, $, ~),
    URLs and flags are not paths."""
    out = set()
    text = re.sub(r"^(```|~~~).*?^\1", "", doc.read_text(), flags=re.M | re.S)     # fenced blocks are not spans
    for tok in re.findall(r"`([^`\n]+)`", text):
        t = tok.split(" ")[0].rstrip(":").removesuffix("()")
        if any(c in t for c in "<*$~") or t.startswith(("http", "--")):
            continue
        if "/" in t or t.endswith((".py", ".md", ".json", ".png", ".sh")):
            out.add(t)
    return out


def test_every_path_the_architecture_names_exists():
    roots = [ROOT, ROOT / "src" / "moespec", ROOT / "docs"]
    paths = named_paths(ROOT / "docs" / "architecture.md")
    assert len(paths) > 30                              # the document does name the code
    assert sorted(t for t in paths if not any((r / t).exists() for r in roots)) == []
