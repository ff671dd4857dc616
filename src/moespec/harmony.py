"""gpt-oss's replies in its harmony format, split into reasoning and content as the text arrives (the server's chat
endpoint and `moespec chat` read them so).

A gpt-oss chat prompt ends with `<|start|>assistant`; the reply is then one or more messages, each a header naming
its channel and a body:

    <|channel|>analysis<|message|>thinking...<|end|><|start|>assistant<|channel|>final<|message|>answer<|return|>

The chat endpoint decodes such a reply with its special tokens kept and returns the `analysis` channel as
`reasoning_content` and the other channels (`final`; `commentary`, which precedes tool calls) as `content`, as
vLLM's and llama.cpp's servers do. A reply that does not open with a channel header is passed through as content.
"""
from __future__ import annotations

MESSAGE, CHANNEL = "<|message|>", "<|channel|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
MARKERS = ("<|start|>", CHANNEL, MESSAGE, "<|constrain|>", *ENDS)
OPENERS = (CHANNEL, "<|start|>")


class HarmonyParser:
    """feed(text) -> (reasoning, content): the parts of the text so far that are complete; finish() flushes."""

    def __init__(self):
        self.buf, self.state, self.channel = "", "start", ""   # state: start | header | body | plain

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        out = {"analysis": [], "content": []}
        while self.buf and self._step(out):
            pass
        return "".join(out["analysis"]), "".join(out["content"])

    def finish(self) -> tuple[str, str]:
        """What is left once the reply ended: an unfinished marker in a body is text; an unfinished header is
        dropped."""
        rest, self.buf = self.buf, ""
        if self.state in ("body", "plain"):
            return (rest, "") if self._is_reasoning() else ("", rest)
        return "", ""

    def _is_reasoning(self) -> bool:
        return self.state == "body" and self.channel == "analysis"

    def _emit(self, out: dict, text: str) -> None:
        if text:
            out["analysis" if self._is_reasoning() else "content"].append(text)

    def _step(self, out: dict) -> bool:
        """Consume what can be decided from the buffer; False when more text is needed."""
        if self.state == "start":                  # a reply opens with a header (<|channel|>, or a whole <|start|>)
            if any(m.startswith(self.buf) and len(self.buf) < len(m) for m in OPENERS):
                return False
            self.state = "header" if self.buf.startswith(OPENERS) else "plain"
            return True
        if self.state == "plain":
            self._emit(out, self.buf)
            self.buf = ""
            return False
        if self.state == "header":                 # <|start|>assistant<|channel|>NAME [to=...] [<|constrain|>x]
            i = self.buf.find(MESSAGE)
            if i < 0:
                return False
            header, self.buf = self.buf[:i], self.buf[i + len(MESSAGE):]
            name = header.rsplit(CHANNEL, 1)[-1].split("<|")[0].split()
            self.channel, self.state = (name[0] if name else ""), "body"
            return True
        i = self.buf.find("<|")                     # body: text until the message's end marker
        if i < 0:
            keep = 1 if self.buf.endswith("<") else 0             # perhaps the start of a marker
            self._emit(out, self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        self._emit(out, self.buf[:i])
        self.buf = self.buf[i:]
        end = next((m for m in ENDS if self.buf.startswith(m)), None)
        if end is not None or self.buf.startswith("<|start|>"):     # (a new message without its end marker)
            self.buf, self.state = self.buf[len(end or ""):], "header"
            return True
        if any(m.startswith(self.buf) for m in MARKERS):          # a marker still arriving
            return False
        self._emit(out, "<|")                                       # "<|" in the text itself
        self.buf = self.buf[2:]
        return True


def split_harmony(text: str) -> tuple[str, str]:
    """A whole reply -> (reasoning, content)."""
    p = HarmonyParser()
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    return r1 + r2, c1 + c2


def uses_harmony(cfg) -> bool:
    """The model (a ModelConfig) answers chats in harmony: gpt-oss."""
    return cfg.model_type == "gpt_oss"
