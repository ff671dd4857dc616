"""Tokenizer, chat template, streaming detokenizer and stop strings, without importing transformers.

`Tokenizer` reads a Hugging Face folder (tokenizer.json, tokenizer_config.json, chat_template.jinja) and gives
the same ids, text and chat prompts as `transformers.AutoTokenizer` 5.x for tokenizers that load tokenizer.json
as written (the generic class, Llama, ...). Like transformers 5, `add_bos_token` / `add_eos_token` in the config
are ignored when tokenizer.json exists: its post-processor decides which special tokens `encode` adds.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import tokenizers

from moespec.chat_template import _alias_reasoning, _compile_template
from moespec.detokenize import IncrementalDetokenizer, StopStringMatcher  # noqa: F401  (re-exported)
from moespec.errors import MoespecError

# Named special tokens, in transformers' order (it decides all_special_ids order and which one is added first).
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


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
        """Token ids of `text`; with add_special_tokens the post-processor's BOS/EOS are added. Text that is not
        valid Unicode (a lone surrogate, as JSON can carry) is a MoespecError naming where."""
        check_text(text)
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

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        """Token ids of the rendered conversation, as transformers' `apply_chat_template(tokenize=True)`: the
        template writes its own BOS, so the post-processor's is not added again."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), add_special_tokens=False)

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


def check_text(text: str, what: str = "text") -> None:
    """Raise a MoespecError when `text` cannot be encoded as UTF-8 (lone surrogates: "\\ud800" in JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MoespecError(f"{what} is not valid Unicode: {e.reason} ({text[e.start]!r}) at character "
                           f"{e.start}") from None
