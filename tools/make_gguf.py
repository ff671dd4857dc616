"""Make llama.cpp GGUF files of a Hugging Face checkpoint, for `moespec bench --peer llama.cpp`.

    python tools/make_gguf.py MODEL_DIR --outtype bf16 q8_0 q4_0 [--out-dir DIR] [--llama-cpp-src DIR]

The converter is `vendor/llama.cpp/convert_hf_to_gguf.py` inside llama-cpp-python's source distribution
(fetched with `pip download llama-cpp-python==0.3.36 --no-binary :all:` unless --llama-cpp-src points at an
unpacked copy); it needs `sentencepiece` and `gguf`'s vendored copy. It recognises a BPE pre-tokenizer by
hashing how it splits a test string, and a byte-level BPE of our own is not in its table: we tell it the
pre-tokenizer is "gpt-2" (the plain byte-level split the bundled tokenizer uses). bf16 and q8_0 come from
the converter itself; q4_0 is quantized from the bf16 file with llama.cpp's own `llama_model_quantize`.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path.home() / ".cache" / "moespec" / "llama.cpp-src"


def converter_dir(src: str | None) -> Path:
    """The llama.cpp folder holding convert_hf_to_gguf.py (downloaded and unpacked once if not given)."""
    if src:
        d = Path(src)
        d = d / "vendor" / "llama.cpp" if (d / "vendor" / "llama.cpp").is_dir() else d
    else:
        d = CACHE / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
        if not d.is_dir():
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-binary",
                            ":all:", "--no-deps", "-d", str(CACHE)], check=True)
            with tarfile.open(CACHE / f"llama_cpp_python-{VERSION}.tar.gz") as t:
                t.extractall(CACHE, filter="data")
    if not (d / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"error: no convert_hf_to_gguf.py under {d}")
    return d


# Run inside a child Python: import the converter, force the pre-tokenizer, run its main with our argv.
RUN = """
import sys
sys.path.insert(0, {d!r})
sys.argv = {argv!r}
import convert_hf_to_gguf as c
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
c.main()
"""


def convert(model: Path, out: Path, outtype: str, d: Path) -> None:
    argv = ["convert_hf_to_gguf.py", str(model), "--outfile", str(out), "--outtype", outtype]
    subprocess.run([sys.executable, "-c", RUN.format(d=str(d), argv=argv)], check=True, cwd=d)


def quantize(src: Path, out: Path, kind: str, threads: int) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        sys.exit(f"error: llama_model_quantize failed for {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--fetch-only", action="store_true", help="only download and unpack the converter's source")
    ap.add_argument("--outtype", nargs="+", default=["bf16", "q8_0", "q4_0"], choices=["f32", "bf16", "q8_0", "q4_0"])
    ap.add_argument("--out-dir", type=Path, default=None, help="default: the model folder")
    ap.add_argument("--llama-cpp-src", default=None, help="unpacked llama-cpp-python (or llama.cpp) source")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.fetch_only:
        print(converter_dir(a.llama_cpp_src))
        return
    if a.model is None:
        ap.error("MODEL is required")
    out_dir = a.out_dir or a.model
    out_dir.mkdir(parents=True, exist_ok=True)
    d = converter_dir(a.llama_cpp_src)
    for t in a.outtype:
        out = out_dir / f"{a.model.name}-{t}.gguf"
        if t == "q4_0":
            src = out_dir / f"{a.model.name}-bf16.gguf"
            if not src.is_file():
                convert(a.model, src, "bf16", d)
            quantize(src, out, t, a.threads)
        else:
            convert(a.model, out, t, d)
        print(out)


if __name__ == "__main__":
    main()
