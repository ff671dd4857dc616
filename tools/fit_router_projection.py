"""Fit the draft model's router projection (spec_decode/router_proj.py) and write it into the draft folder, where
draft-guided prefetch with that draft model finds it. The bundled draft ships the one for the bundled model:

    python tools/fit_router_projection.py                       # bundled target and draft
    python tools/fit_router_projection.py TARGET DRAFT [--tokens 32768]
"""
import argparse
import json
from pathlib import Path

from moespec.assets import REFERENCE_DRAFT, REFERENCE_MODEL
from moespec.loading import load_model
from moespec.spec_decode.router_proj import FILE, corpus, fit_projection
from moespec.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", default=str(REFERENCE_MODEL))
    p.add_argument("draft", nargs="?", default=str(REFERENCE_DRAFT))
    p.add_argument("--tokens", type=int, default=32768, help="corpus tokens to fit on (default 32768)")
    a = p.parse_args()
    target, draft = load_model(a.target, "float32"), load_model(a.draft, "float32")
    tok = Tokenizer.from_folder(a.target) if (Path(a.target) / "tokenizer.json").is_file() else None
    proj = fit_projection(target, draft, corpus(tok, target.cfg.vocab_size, a.tokens))
    out = Path(a.draft) / FILE
    proj.save(out)
    print(json.dumps({"written": str(out), **proj.meta}, indent=1))


if __name__ == "__main__":
    main()
