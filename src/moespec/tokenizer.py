"""Tokenizer, chat template, streaming detokenizer and stop strings, without importing transformers.

`Tokenizer` reads a Hugging Face folder (tokenizer.json, tokenizer_config.json, chat_template.jinja) and gives
the same ids, text and chat prompts as `transformers.AutoTokenizer` 5.x for tokenizers that load tokenizer.json
as written (the generic class, Llama, ...). Like transformers 5, `add_bos_token` / `add_eos_token` in the config
are ignored when tokenizer.json exists: its post-processor decides which special tokens `encode` adds.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moespec.errors import MoespecError

# Named special tokens, in transformers' order (it decides all_special_ids order and which one is added first).
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; templates read `reasoning_content` (gpt-oss reads `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A model's tokenizer and chat template. Build with `Tokenizer.from_folder(path)`."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict, chat_template: str | dict | None):
        self._tok = backend
        self._special_map = _special_tokens_map(config)
        self._extra_specials = _extra_special_tokens(config)
        _add_missing_tokens(backend, config, self._special_map, self._extra_specials)
        self.chat_template = chat_template
        self._compiled: dict[str, jinja2.Template] = {}
        # transformers skips the WordPiece-era clean-up for BPE because it deletes real spaces before punctuation.
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and chat_template.jinja (which wins over the config's)."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise MoespecError(f"no tokenizer.json in model folder: {tok_file}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises bare Exceptions for malformed files
            raise MoespecError(f"cannot read tokenizer file {tok_file}: {e}") from e
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...] as saved by transformers
            template = {t["name"]: t["template"] for t in template}
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, config, template)

    # -- text <-> ids ----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens the post-processor's BOS/EOS are added."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, as transformers' decode with the same skip_special_tokens."""
        text = self.decode_raw(ids, skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def decode_raw(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode without the config's clean-up; what streaming uses, since clean-up is not window-stable."""
        ids = ids if isinstance(ids, list) else [int(i) for i in ids]  # also tensors / arrays
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (vocabulary or added token), or None."""
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self._special_map.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self._special_map.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens then the extra ones, without duplicates (transformers' order)."""
        ids: list[int] = []
        for token in [*self._special_map.values(), *self._extra_specials]:
            i = self._id_of(token)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # -- chat ------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render a conversation to a prompt string exactly as transformers' `apply_chat_template(tokenize=False)`.

        `extra` goes to the template (tools, documents, enable_thinking, ...) and overrides the special tokens.
        Encode the result with `add_special_tokens=False`: the template already writes BOS where it wants one.
        """
        if not messages:
            raise MoespecError("messages is empty: a chat needs at least one message")
        template = self._compiled_template(tools=extra.get("tools"))
        chat = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise MoespecError(f"messages[{i}] must be an object with role and content, got {message!r}")
            # Clients send content=None / tool_calls=None; templates handle a missing key but print "None".
            chat.append(_alias_reasoning({k: v for k, v in message.items() if v is not None}))
        variables = {"tools": None, "documents": None, **self._special_map, **extra}
        try:
            return template.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:  # raise_exception() in templates reports bad conversations this way
            raise MoespecError(f"chat template rejected the messages: {e}") from e

    def _compiled_template(self, tools) -> jinja2.Template:
        source = self.chat_template
        name = "default"
        if isinstance(source, dict):
            name = "tool_use" if tools is not None and "tool_use" in source else "default"
            if name not in source:
                raise MoespecError(f"model has several chat templates {sorted(source)} and none named 'default'")
            source = source[name]
        if source is None:
            raise MoespecError("model has no chat template (no chat_template in tokenizer_config.json and no "
                               "chat_template.jinja); use a completion prompt instead")
        if name not in self._compiled:
            self._compiled[name] = _compile_template(source)
        return self._compiled[name]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MoespecError(f"cannot parse {path}: {e}") from e


def _token_content(value) -> str | None:
    """Config tokens are strings or AddedToken dicts ({"__type": "AddedToken", "content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens_map(config: dict) -> dict[str, str]:
    """bos/eos/... plus model-specific `*_token` entries, as transformers' special_tokens_map (template vars)."""
    out = {k: _token_content(config.get(k)) for k in _NAMED_SPECIALS}
    for key, value in config.items():
        if key.endswith("_token") and key not in out and isinstance(value, str):
            out[key] = value
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):  # named form: {"image_token": "<image>"}
        out.update({k: _token_content(v) for k, v in extra.items()})
    return {k: v for k, v in out.items() if v is not None}


def _extra_special_tokens(config: dict) -> list[str]:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        return []  # already named in _special_tokens_map
    return [t for t in (_token_content(v) for v in extra) if t is not None]


def _add_missing_tokens(backend: tokenizers.Tokenizer, config: dict, named: dict, extra: list[str]) -> None:
    """Add tokens the config declares but tokenizer.json lacks, in transformers' order, so ids agree."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    to_add: list[tokenizers.AddedToken] = []
    for _, spec in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        if spec.get("content") not in present:
            fields = ("single_word", "lstrip", "rstrip", "normalized", "special")
            to_add.append(tokenizers.AddedToken(spec["content"], **{f: spec[f] for f in fields if f in spec}))
    for content in [*named.values(), *extra]:
        if content not in present and all(t.content != content for t in to_add):
            to_add.append(tokenizers.AddedToken(content, special=True, normalized=False))
    if to_add:
        backend.add_tokens(to_add)


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization, for WordPiece-style tokenizers that ask for it.
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _alias_reasoning(message: dict) -> dict:
    # Same as transformers: fill `reasoning_content` (and `thinking`, for gpt-oss) from whichever name was used.
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


# -- chat template environment (mirrors transformers/utils/chat_template_utils.py) ------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it renders as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateDict:
    # `dict(...)` for templates without exposing the dict type itself to attribute tricks.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces that refuse underscore names, so templates cannot reach CPython internals through them.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    # Chat templates come from the Hub and are untrusted code: always the immutable sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise MoespecError(f"cannot compile the model's chat template: {e}") from e


# -- streaming -------------------------------------------------------------------------------------------------


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

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
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
