"""Models that ship inside the package."""
from __future__ import annotations

from pathlib import Path

from .errors import MoespecError

ASSETS = Path(__file__).parent / "assets"
REFERENCE_MODEL = ASSETS / "reference-moe"
REFERENCE_DRAFT = ASSETS / "reference-draft"


def resolve_model(model: str | Path | None) -> Path:
    """The folder to load: the one given, or the bundled reference model when none is given."""
    if model is not None:
        return Path(model)
    if not (REFERENCE_MODEL / "config.json").is_file():
        raise MoespecError("no MODEL given and no bundled reference model is installed yet; "
                           "pass a Hugging Face checkpoint folder, e.g. `moespec generate path/to/model --prompt hi`")
    return REFERENCE_MODEL
