"""Editing a packed expert file's header in place (tests that damage or alter packs)."""
import json


def edit_header(raw: bytearray, change) -> None:
    """Apply change(header dict) to the header of the packed file bytes `raw`, keeping every offset."""
    n = int(raw[:16])
    h = json.loads(raw[16:16 + n])
    change(h)
    head = json.dumps(h).encode()
    assert 16 + len(head) <= h["data_offset"], "the edited header no longer fits before the data"
    raw[:h["data_offset"]] = b"%015d\n" % len(head) + head + b" " * (h["data_offset"] - 16 - len(head))
