"""Streaming text: an incremental detokenizer and a stop-string matcher."""

from __future__ import annotations

from moespec.errors import MoespecError


class IncrementalDetokenizer:
    """Turn generated ids into text deltas whose concatenation is `tokenizer.decode(all generated ids)`.

    Each push decodes only a short window of recent ids, so the cost per token does not grow with the output
    (vLLM's prefix/read-offset scheme, counted in characters). While the window's text ends in U+FFFD an
    incomplete UTF-8 character may be in progress, so nothing new is emitted until it completes; `flush()`
    releases a character that never did. Prompt ids, if given, seed the window so the first token decodes in
    context (its leading space survives). The config's clean-up step (off for BPE models) is not applied.

    Exactness holds for valid UTF-8 output. Invalid bytes are streamed best-effort: byte-fallback decoders
    rewrite a whole run of byte tokens to U+FFFD when a later byte breaks it, which no stream can take back.
    """

    _CONTEXT = 4  # ids kept when the window is re-anchored; decoders need a little left context
    _MAX_WINDOW = 12  # re-anchor the window once it is this long
    _MAX_PENDING = 3  # an incomplete UTF-8 char has at most 3 bytes, so at most 3 tokens can be waiting on it

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window = list(prompt_ids or [])[-self._CONTEXT:]
        self._emitted = len(self._decode(self._window))  # chars of the window's text already out (or prompt)
        self._pending = 0  # ids pushed since the window's text last ended on a complete character
        self._parts: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode_raw(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (possibly "")."""
        self._window.append(int(token_id))
        self._pending += 1
        text = self._decode(self._window)
        held = _trailing_fffd(text)
        if held and self._pending <= self._MAX_PENDING:
            return ""  # maybe a character still arriving byte by byte
        # More pending ids than a character can span: the U+FFFDs are real garbage. Emit all but the last few,
        # which could still be the start of a new character.
        held = min(held, self._MAX_PENDING)
        end = len(text) - held
        delta = text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        if held == 0:
            self._pending = 0
        if len(self._window) >= self._MAX_WINDOW:
            self._reanchor(text, end)
        if delta:
            self._parts.append(delta)
        return delta

    def _reanchor(self, text: str, end: int) -> None:
        """Drop old ids from the window, keeping the emitted/held split where it is.

        A cut is only taken if the shorter window decodes to a suffix of the current text (held tail included):
        cutting inside a multi-byte character would turn its remaining bytes into U+FFFD, so then the next cut
        to the left is tried (a character spans at most 4 tokens).
        """
        tail = text[end:]
        for cut in range(len(self._window) - self._CONTEXT, len(self._window) - self._CONTEXT - 4, -1):
            if cut <= 0:
                return
            new_text = self._decode(self._window[cut:])
            new_end = len(new_text) - len(tail)
            if new_end >= 0 and new_text.endswith(tail) and text[:end].endswith(new_text[:new_end]):
                self._window = self._window[cut:]
                self._emitted = new_end
                return
        # no clean cut (a long run of broken bytes): keep the longer window; exactness is unaffected

    def flush(self) -> str:
        """At the end of generation: release held-back text (a character that was never completed)."""
        text = self._decode(self._window)
        delta = text[self._emitted:]
        self._emitted = len(text)
        self._pending = 0
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


def _trailing_fffd(text: str) -> int:
    """Number of trailing U+FFFD (replacement characters) in text."""
    return len(text) - len(text.rstrip("\ufffd"))


class StopStringMatcher:
    """Cut streamed text at the first stop string (which is not emitted, as vLLM does by default).

    Text that could be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, stops: list[str]):
        for s in stops:
            if not isinstance(s, str) or not s:
                raise MoespecError(f"invalid sampling value: stop={s!r} (stop strings must be non-empty strings)")
        self.stops = list(stops)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, stopped). After a stop, everything is dropped."""
        if self.stopped:
            return "", True
        buf = self._held + delta
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def _partial_suffix(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string; it could still grow into a match.
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason (EOS, length)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out
