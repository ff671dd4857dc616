"""The disk tier: packing, validation, O_DIRECT and its fallback, and failures that must surface."""
import errno
import os
import shutil
import struct
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from moespec.config import OffloadConfig
from moespec.errors import MoespecError
from moespec.experts import packfile
from moespec.loading import load_model
from packs import edit_header, split_shards

TOKENS = torch.tensor([[5, 17, 3, 99, 42, 7, 11, 200, 1]])


@pytest.fixture
def ckpt(family_dirs, tmp_path):
    """A private copy of the tiny Mixtral (tests here modify checkpoints and offload files)."""
    folder = tmp_path / "mixtral"
    shutil.copytree(family_dirs["mixtral"][0], folder)
    return folder


def logits(model, tokens=TOKENS):
    return model.forward(tokens, model.new_cache(tokens.shape[0], 16)).logits


def disk(folder, tmp_path, **kw):
    cfg = OffloadConfig(**{"expert_cache": 2, "offload": "disk", "offload_dir": str(tmp_path / "off"), **kw})
    return load_model(folder, auto_layout=False, offload=cfg)


def pack_file(m):
    return m.experts.store.path


def test_pack_is_built_once_then_reused(ckpt, tmp_path):
    ref = logits(load_model(ckpt, auto_layout=False))
    a = disk(ckpt, tmp_path)
    assert a.experts.store.build_reason == "missing"
    path = pack_file(a)
    header = packfile.read_header(path)
    assert header["stride"] % 4096 == 0 and header["file_bytes"] == path.stat().st_size
    assert header["data_offset"] % 4096 == 0 and header["checksum"] == "crc32c"
    assert header["dtype"] == "float32" and header["num_experts"] == 6
    a.experts.close()
    mtime = path.stat().st_mtime_ns
    b = disk(ckpt, tmp_path)
    assert b.experts.store.build_reason is None and path.stat().st_mtime_ns == mtime
    assert torch.equal(logits(b), ref)
    b.experts.close()


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "header_mismatch", "wrong_format"])
def test_damaged_pack_is_rebuilt_never_read(damage, ckpt, tmp_path):
    ref = logits(load_model(ckpt, auto_layout=False))
    disk(ckpt, tmp_path).experts.close()
    path = packfile.pack_path(tmp_path / "off", ckpt, {"dtype": "float32"})
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-4096]
    elif damage == "garbage_header":
        raw[:16] = b"\x00garbage\xff\xfe\x00\x00\x00\x00\x00\x00"
    else:
        edit_header(raw, (lambda h: h.update(blob_bytes=h["blob_bytes"] + 4)) if damage == "header_mismatch"
                    else (lambda h: h.update(version=99)))
    path.write_bytes(bytes(raw))
    m = disk(ckpt, tmp_path)
    reason = m.experts.store.build_reason
    assert reason is not None and reason != "missing"
    if damage == "truncate":
        assert reason.startswith("truncated")
    assert torch.equal(logits(m), ref)
    m.experts.close()


def test_checkpoint_changed_since_packing_is_repacked(ckpt, tmp_path):
    disk(ckpt, tmp_path).experts.close()
    sd = load_file(ckpt / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    sd[name] = sd[name] * -2.0                    # same shapes, same header bytes: only mtime/size tell
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    ref = logits(load_model(ckpt, auto_layout=False))
    m = disk(ckpt, tmp_path, expert_cache=6)
    assert m.experts.store.build_reason == "checkpoint changed since packing"
    assert torch.equal(logits(m), ref)
    m.experts.close()


def test_offload_dir_that_cannot_be_used_is_a_clear_error(ckpt, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MoespecError, match="offload dir .*afile is not a directory"):
        disk(ckpt, tmp_path, offload_dir=str(tmp_path / "afile"))
    with pytest.raises(MoespecError, match="cannot create offload dir .*afile/sub"):
        disk(ckpt, tmp_path, offload_dir=str(tmp_path / "afile" / "sub"))
    # An unreadable pack file (here: a directory where the file should be).
    packfile.pack_path(tmp_path / "odd", ckpt, {"dtype": "float32"}).mkdir(parents=True)
    with pytest.raises(MoespecError, match="cannot read the packed expert file"):
        disk(ckpt, tmp_path, offload_dir=str(tmp_path / "odd"))


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs a read-only /sys")
def test_unwritable_offload_dir_is_a_clear_error(ckpt, tmp_path):
    with pytest.raises(MoespecError, match="cannot create offload dir /sys/"):
        disk(ckpt, tmp_path, offload_dir="/sys/moespec-offload-test")


def test_read_only_offload_dir_is_a_clear_error(ckpt, tmp_path, monkeypatch):
    # Directory permissions do not bind root (CI runs as root), so the denial is simulated where the
    # pack file is written.
    import builtins
    d = tmp_path / "ro"
    d.mkdir()
    real_open = builtins.open

    def deny(file, mode="r", *a, **k):
        if str(file).startswith(str(d)) and any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(MoespecError, match="cannot write the packed expert file .*Permission denied"):
        disk(ckpt, tmp_path, offload_dir=str(d))


def test_filesystems_without_o_direct_fall_back_to_buffered_reads(ckpt, tmp_path, monkeypatch):
    ref = logits(load_model(ckpt, auto_layout=False))
    real_open = os.open

    def no_direct(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", no_direct)
    m = disk(ckpt, tmp_path)
    assert m.experts.store.direct_io is False
    assert torch.equal(logits(m), ref)
    m.experts.close()


def test_o_direct_refused_at_read_time_falls_back(ckpt, tmp_path, monkeypatch):
    ref = logits(load_model(ckpt, auto_layout=False))
    m = disk(ckpt, tmp_path)
    real = os.preadv
    calls = []

    def refuse_once(fd, bufs, off):
        if not calls:
            calls.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off)
    monkeypatch.setattr(os, "preadv", refuse_once)
    assert torch.equal(logits(m), ref)
    assert calls and m.experts.store.direct_io is False
    m.experts.close()


def test_loader_failure_surfaces_as_an_error_and_the_cache_recovers(ckpt, tmp_path):
    ref = logits(load_model(ckpt, auto_layout=False))
    m = disk(ckpt, tmp_path, expert_cache=1)
    store = m.experts.store
    real = store.load

    def boom(*a):
        raise RuntimeError("injected read failure")
    store.load = boom
    with pytest.raises(MoespecError, match="loading expert .* failed: RuntimeError: injected read failure"):
        logits(m)
    for layer in m.cfg.moe_layer_ids:
        m.experts.check(layer)
        assert m.experts.resident(layer).numel() == 0      # the failed slot holds nothing
    store.load = real
    assert torch.equal(logits(m), ref)
    m.experts.close()


def test_offload_file_truncated_mid_run_is_an_error_not_wrong_weights(ckpt, tmp_path):
    m = disk(ckpt, tmp_path, expert_cache=1)
    logits(m)
    os.truncate(pack_file(m), 4096)
    with pytest.raises(MoespecError, match="short read"):
        logits(m)
    m.experts.close()


def test_a_stalled_load_times_out_with_a_clear_message(ckpt, tmp_path):
    m = disk(ckpt, tmp_path, expert_cache=1, io_timeout_s=0.3)
    store = m.experts.store
    real = store.load

    def slow(*a):
        time.sleep(3.0)
        return real(*a)
    store.load = slow
    t = time.perf_counter()
    with pytest.raises(MoespecError, match=r"took more than 0.3s"):
        logits(m)
    assert time.perf_counter() - t < 2.0                # the timeout fired, not the 3 s read
    m.experts.close()


def test_a_failed_load_surfaces_and_leaves_no_stuck_slot(ckpt, tmp_path):
    ref = logits(load_model(ckpt, auto_layout=False))
    m = disk(ckpt, tmp_path, expert_cache=2, prefetch="next-layer", io_timeout_s=5)
    store = m.experts.store
    real = store.load

    def boom(*a):
        raise OSError(5, "Input/output error")
    store.load = boom
    with pytest.raises(MoespecError, match="Input/output error"):
        logits(m)
    store.load = real
    t = time.perf_counter()
    assert torch.equal(logits(m), ref)
    assert time.perf_counter() - t < 4                    # no wait on a load that will never come
    for layer in m.cfg.moe_layer_ids:
        m.experts.check(layer)
    m.experts.close()


def test_a_dropped_model_stops_its_loader_threads(ckpt, tmp_path):
    import gc
    m = disk(ckpt, tmp_path)
    logits(m)
    loader = m.experts.loader
    assert loader.alive()
    del m
    gc.collect()
    assert not loader.alive()


def test_a_prefetch_never_waits_on_a_load_in_flight(ckpt, tmp_path):
    """Draft-guided prefetch runs on the drafting thread: when every evictable slot is still loading, it skips
    instead of stalling there (a demand load would wait)."""
    m = disk(ckpt, tmp_path, expert_cache=2, io_timeout_s=10)
    store, cache = m.experts.store, m.experts
    real = store.load
    gate = threading.Event()

    def slow(*a):
        gate.wait(5.0)
        return real(*a)
    store.load = slow
    layer = m.cfg.moe_layer_ids[0]
    assert cache.prefetch(layer, [0, 1]) == 2           # both slots now hold loads in flight
    t = time.perf_counter()
    assert cache.prefetch(layer, [2, 3]) == 0           # no slot has landed: skipped, not waited for
    assert time.perf_counter() - t < 1.0
    assert sorted(cache.cached(layer).tolist()) == [0, 1]
    gate.set()
    store.load = real
    assert torch.equal(logits(m), logits(load_model(ckpt, auto_layout=False)))
    m.experts.close()


@pytest.mark.parametrize("damage", ["flipped_bit", "inf"])
def test_a_damaged_expert_is_a_clear_error_not_silent_weights(damage, ckpt, tmp_path):
    """The pack's header still matches, but one expert's bytes changed on disk: its checksum catches the read."""
    m = disk(ckpt, tmp_path, expert_cache=6)
    path, h = m.experts.store.path, m.experts.store.header
    m.experts.close()
    raw = bytearray(path.read_bytes())
    at = h["data_offset"] + 2 * h["stride"] + 100          # expert 2 of the first MoE layer
    if damage == "flipped_bit":
        raw[at] ^= 0x10
    else:
        raw[at:at + 4] = struct.pack("<f", float("inf"))
    path.write_bytes(bytes(raw))
    m = disk(ckpt, tmp_path, expert_cache=6)
    assert m.experts.store.build_reason is None                    # the header cannot tell
    with pytest.raises(MoespecError, match=r"expert 2 of MoE layer 0 read from .* does not match its checksum"):
        logits(m)
    m.experts.close()


def test_a_header_longer_than_a_page_packs_and_reads(ckpt, tmp_path):
    """A checkpoint of many shards (Mixtral-8x22B, Qwen3-235B: 40-100 files) makes a long header."""
    split_shards(ckpt, 40)
    ref = logits(load_model(ckpt, auto_layout=False))
    m = disk(ckpt, tmp_path)
    h = m.experts.store.header
    assert len(h["checkpoint"]) == 41 and h["data_offset"] > 4096          # 40 shards and config.json
    assert torch.equal(logits(m), ref)
    m.experts.close()


def test_a_40_shard_checkpoint_is_served_from_the_disk_tier(text_model, tmp_path):
    """Packed on first load and served over HTTP: the reply is the resident model's greedy output."""
    from fastapi.testclient import TestClient

    from moespec import LLM, SamplingParams
    from moespec.serve.app import create_app
    ckpt = tmp_path / "text"
    shutil.copytree(text_model, ckpt)
    split_shards(ckpt, 40)
    want = LLM(ckpt).generate([[5, 17, 3, 99]], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))[0]
    assert len(want.text) > 10
    llm = LLM(ckpt, offload=OffloadConfig(expert_cache=2, offload="disk", offload_dir=str(tmp_path / "off")))
    assert llm.model.experts.store.build_reason == "missing"
    with TestClient(create_app(llm, "tiny")) as c:
        r = c.post("/v1/completions", json={"prompt": [5, 17, 3, 99], "max_tokens": 24, "ignore_eos": True,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want.text and r.json()["usage"]["completion_tokens"] == 24
    assert llm.model.experts.stats()["misses"] > 0
    llm.close()


def test_a_writer_killed_while_packing_leaves_no_orphan(ckpt, tmp_path):
    """Packing writes a temporary file named by its pid: after a kill -9, the next packer removes it."""
    import subprocess
    import sys
    off = tmp_path / "off"
    off.mkdir()
    path = packfile.pack_path(off, ckpt, {"dtype": "float32"})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = path.with_name(f".{path.name}.{int(dead.stdout)}.tmp")
    orphan.write_bytes(b"half a pack")
    m = disk(ckpt, tmp_path)
    assert not orphan.exists() and m.experts.store.build_reason == "missing"
    assert torch.equal(logits(m), logits(load_model(ckpt, auto_layout=False)))
    m.experts.close()


def test_a_packer_killed_mid_write_then_a_restart_leaves_no_orphan(ckpt, tmp_path):
    """A real kill -9 while another process is packing: the next run removes its temp file, packs again and
    decodes the checkpoint's own tokens."""
    import signal
    import subprocess
    import sys
    off = tmp_path / "off"
    code = (
        "import sys, time\n"
        "import moespec.loading.experts as b\n"
        "real = b.load_expert_pool\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.2)\n"
        "    return real(*a, **k)\n"
        "b.load_expert_pool = slow\n"
        "from moespec.config import OffloadConfig\n"
        "from moespec.loading import load_model\n"
        "load_model(sys.argv[1], auto_layout=False, offload=OffloadConfig(expert_cache=2, offload='disk', "
        "offload_dir=sys.argv[2]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ckpt), str(off)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not [p for p in off.glob(".*.tmp") if p.stat().st_size > 4096] and time.monotonic() < deadline:
        assert proc.poll() is None, "the packer ended before it could be killed"
        time.sleep(0.05)
    orphans = list(off.glob(".*.tmp"))
    assert len(orphans) == 1 and str(proc.pid) in orphans[0].name
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    assert orphans[0].exists() and not list(off.glob("*.experts"))       # half a pack, never renamed
    m = disk(ckpt, tmp_path)
    assert not orphans[0].exists() and m.experts.store.build_reason == "missing"
    assert list(off.iterdir()) == [pack_file(m)]
    assert torch.equal(logits(m), logits(load_model(ckpt, auto_layout=False)))
    m.experts.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_loader_thread_that_dies_is_a_clear_error_not_a_hang(ckpt, tmp_path):
    m = disk(ckpt, tmp_path, expert_cache=1, io_timeout_s=30)
    loader = m.experts.loader

    def die():
        raise RuntimeError("injected: the loader thread dies")
    loader._take = die                  # the thread's own loop fails, outside any one load
    t = time.perf_counter()
    with pytest.raises(MoespecError, match="the expert loader stopped before loading expert"):
        logits(m)
    assert time.perf_counter() - t < 5 and not loader.alive()      # noticed at once, not after the 30 s timeout
    m.experts.close()
