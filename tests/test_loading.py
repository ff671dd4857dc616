"""Loading: the checkpoint reader, --dtype auto, and loading and packing that peak near what they keep."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import hf_models
from moespec import LLM, SamplingParams
from moespec.errors import MoespecError
from moespec.loading import Checkpoint
from moespec.loading import load_model, resolve_dtype


def test_reader_reads_tensors_and_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(4, 3, 5, generator=g).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int32),
          "c": torch.zeros(0, 3), "d": torch.randn(2, 2, dtype=torch.float64, generator=g)}
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ck = Checkpoint(tmp_path)
    assert ck.names == set(sd)
    for k, v in sd.items():
        assert torch.equal(ck.get(k), v) and ck.get(k).dtype == v.dtype
    assert torch.equal(ck.get_rows("a", 1, 3), sd["a"][1:3])
    assert ck.info("a") == (torch.bfloat16, (4, 3, 5))
    with pytest.raises(MoespecError, match=r"tensor 'a' has shape \(4, 3, 5\), expected \(4, 15\)"):
        ck.get("a", (4, 15))
    with pytest.raises(MoespecError, match="is missing tensor 'e'"):
        ck.get("e")


def test_reader_names_a_truncated_or_garbage_file(tmp_path):
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "model.safetensors"))
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-1000])
    with pytest.raises(MoespecError, match="cannot read tensor 'w' from .*model.safetensors: the file is truncated"):
        Checkpoint(tmp_path).get("w")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(MoespecError, match="not a safetensors file"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("stored, expect", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float16, torch.bfloat16)])
def test_dtype_auto_is_the_checkpoints_own(stored, expect, tmp_path):
    hf_models.build("olmoe", tmp_path, dtype=stored)
    assert resolve_dtype("auto", tmp_path) == expect                       # float16 runs as bfloat16 on a CPU
    assert load_model(tmp_path).dtype == expect
    assert resolve_dtype("float32", tmp_path) == torch.float32
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert resolve_dtype("auto", tmp_path) == expect                       # from the tensors themselves


def test_bf16_ragged_batch_decodes(tmp_path):
    """A bf16 model keeps a float32 KV cache on CPU; prompts of different lengths write it through index_put."""
    hf_models.build("qwen3_moe", tmp_path, dtype=torch.bfloat16)
    llm = LLM(tmp_path)
    assert llm.dtype == "bfloat16"
    outs = llm.generate([[5, 17, 3, 99, 42, 7], [11, 2]], SamplingParams(max_new_tokens=5, temperature=0,
                                                                        ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 5]


PEAK = textwrap.dedent("""
    import json, os, sys
    import torch
    from moespec.config import OffloadConfig
    from moespec.loading import load_model
    def rss():
        return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    base = rss()
    kw = json.loads(sys.argv[2])
    if 'offload' in kw:
        kw['offload'] = OffloadConfig(**kw['offload'])
    m = load_model(sys.argv[1], **kw)
    from moespec.bench.cli import peak_rss_bytes
    print(json.dumps({"peak": peak_rss_bytes() - base, "now": rss() - base}))
""")


def peak_rss(folder, **kw) -> dict:
    r = subprocess.run([sys.executable, "-c", PEAK, str(folder), json.dumps(kw)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A 115M-parameter random Mixtral in bf16 (231 MB): big enough that a second copy would show."""
    from moespec.bench.synthetic import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "small", "small")


@pytest.mark.slow
def test_loading_peaks_near_the_weights_it_keeps(mid_model):
    weights = (mid_model / "model.safetensors").stat().st_size          # bf16 checkpoint, bf16 run
    got = peak_rss(mid_model)
    # Reading through a memory map kept every page of the file in RSS beside the copies: 2x and more.
    assert got["peak"] <= 1.15 * weights + 100e6, got
    q = peak_rss(mid_model, quant="int8")
    assert q["peak"] <= 0.85 * got["peak"], (q, got)                    # experts at half the bytes, dense kept bf16


def test_packing_streams_one_expert_at_a_time(tmp_path):
    """2 layers of 32 experts of 3 MiB: packing a layer at a time held 100 MB at once."""
    from moespec.bench.synthetic import make_synthetic
    folder = make_synthetic(tmp_path / "wide", "small", num_hidden_layers=2, num_local_experts=32)
    weights = (folder / "model.safetensors").stat().st_size
    expert = 3 * 512 * 1024 * 2
    experts = 2 * 32 * expert
    got = peak_rss(folder, auto_layout=False,       # (no layout timing: its samples would hide what packing holds)
                   offload={"expert_cache": 1, "offload": "disk", "offload_dir": str(tmp_path / "off")})
    assert next((tmp_path / "off").glob("*.experts")).stat().st_size > experts      # it did pack every expert
    resident = weights - experts                                       # dense weights (slots fill on first use)
    assert got["peak"] <= resident + 64e6, (got, resident)
