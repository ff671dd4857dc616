"""Editing a packed expert file's header in place (tests that damage or alter packs); splitting a checkpoint."""
import json

from safetensors.torch import load_file, save_file


def edit_header(raw: bytearray, change) -> None:
    """Apply change(header dict) to the header of the packed file bytes `raw`, keeping every offset."""
    n = int(raw[:16])
    h = json.loads(raw[16:16 + n])
    change(h)
    head = json.dumps(h).encode()
    assert 16 + len(head) <= h["data_offset"], "the edited header no longer fits before the data"
    raw[:h["data_offset"]] = b"%015d\n" % len(head) + head + b" " * (h["data_offset"] - 16 - len(head))


def split_shards(folder, shards: int) -> None:
    """Rewrite folder's model.safetensors as `shards` files with an index, as large checkpoints ship (Mixtral-8x22B,
    Qwen3-235B: 40-100 files); every shard holds at least one tensor."""
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(sd)
    assert len(names) >= shards, f"{len(names)} tensors cannot fill {shards} shards"
    index = {"metadata": {}, "weight_map": {}}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[i::shards]}
        save_file(part, folder / fname, metadata={"format": "pt"})
        index["weight_map"].update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
