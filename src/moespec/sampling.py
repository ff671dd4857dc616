"""Sampling parameters and the token distribution they define.

`target_probs` is the single definition of "the distribution we sample from": plain sampling draws from it, and
speculative decoding uses it for both the draft (q) and the target (p), so acceptance is exact only if every
caller goes through this one function.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from moespec.errors import MoespecError

# Used when neither the request nor generation_config.json says otherwise (vLLM's choices).
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0  # 0 (or -1 on input) disables top-k
DEFAULT_SAMPLE_TEMPERATURE = 1.0

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts at most this
MIN_TEMPERATURE = 1e-5  # below this a temperature decodes greedily (vLLM's rule): logits / 1e-40 overflow to inf
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1024     # every token is matched against every stop string: bound them
LOGIT_LIMIT = 1e30      # penalised logits are clamped here, so an extreme penalty cannot make them infinite


@dataclass
class SamplingParams:
    """Per-request sampling settings. None means "take the model's default" (see `with_defaults`)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # Penalties on tokens already seen (vLLM's and OpenAI's meanings): repetition_penalty > 1 divides a seen
    # token's positive logit (multiplies a negative one), over prompt and output; presence_penalty subtracts
    # once, frequency_penalty once per occurrence, for tokens of the output only. 1 / 0 / 0 = off.
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Text keeps the special tokens (vLLM's field): the server reads gpt-oss's harmony markers from them.
    skip_special_tokens: bool = True

    def with_defaults(self, gen_config: dict) -> SamplingParams:
        """Return a copy with None fields filled from a `generation_config.json` dict.

        As in transformers, a model whose config does not set `do_sample: true` decodes greedily by default
        (temperature 0); a temperature below MIN_TEMPERATURE decodes greedily too (as vLLM); with `do_sample: true` the default temperature is the config's, else 1.0. Missing top_p,
        top_k and max_new_tokens fall back to 1.0, 0 (disabled) and 256. `stop` becomes a list and
        `stop_token_ids` a list; EOS handling is the engine's business and is not touched here.
        """
        cfg = {k: v for k, v in (gen_config or {}).items() if v is not None}  # JSON null = absent
        if self.temperature is not None:
            temperature = self.temperature if self.temperature >= MIN_TEMPERATURE else 0.0
        elif cfg.get("do_sample", False):
            temperature = float(cfg.get("temperature", DEFAULT_SAMPLE_TEMPERATURE))
        else:
            temperature = 0.0
        top_k = self.top_k if self.top_k is not None else int(cfg.get("top_k", DEFAULT_TOP_K))
        return dataclasses.replace(
            self,
            temperature=temperature,
            top_p=self.top_p if self.top_p is not None else float(cfg.get("top_p", DEFAULT_TOP_P)),
            top_k=0 if top_k == -1 else top_k,  # one spelling of "disabled" downstream
            max_new_tokens=(
                self.max_new_tokens
                if self.max_new_tokens is not None
                else int(cfg.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
            ),
            stop=_as_list(self.stop),
            stop_token_ids=list(self.stop_token_ids or []),
            repetition_penalty=(self.repetition_penalty if self.repetition_penalty is not None
                                else float(cfg.get("repetition_penalty", 1.0))),
            presence_penalty=self.presence_penalty if self.presence_penalty is not None else 0.0,
            frequency_penalty=self.frequency_penalty if self.frequency_penalty is not None else 0.0,
        )

    def validate(self) -> None:
        """Raise MoespecError naming the first bad field. None fields (model defaults) are accepted."""
        t, p, k, n, seed = self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.seed
        if t is not None and (not _is_number(t) or not math.isfinite(t) or t < 0):
            _bad("temperature", t, "must be a finite number >= 0")
        if p is not None and (not _is_number(p) or not 0 < p <= 1):
            _bad("top_p", p, "must be in (0, 1]")
        if k is not None and (not _is_int(k) or k < -1):
            _bad("top_k", k, "must be an integer >= 1, or 0 / -1 to disable")
        if n is not None and (not _is_int(n) or n < 1):
            _bad("max_new_tokens", n, "must be an integer >= 1")
        if seed is not None and (not _is_int(seed) or not 0 <= seed <= _MAX_SEED):
            _bad("seed", seed, "must be an integer in [0, 2**64)")
        stops = self.stop if isinstance(self.stop, list) else [self.stop] if self.stop is not None else []
        if len(stops) > MAX_STOP_STRINGS:
            _bad("stop", f"<{len(stops)} strings>", f"at most {MAX_STOP_STRINGS} stop strings")
        for s in stops:
            if not isinstance(s, str) or s == "":
                _bad("stop", s, "stop strings must be non-empty strings")
            if len(s) > MAX_STOP_CHARS:
                _bad("stop", s[:20] + "...", f"a stop string may have at most {MAX_STOP_CHARS} characters")
        for tok in self.stop_token_ids or []:
            if not _is_int(tok) or tok < 0:
                _bad("stop_token_ids", tok, "token ids must be integers >= 0")
        rp = self.repetition_penalty
        if rp is not None and (not _is_number(rp) or not math.isfinite(rp) or rp <= 0):
            _bad("repetition_penalty", rp, "must be a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or not -2 <= v <= 2):
                _bad(name, v, "must be in [-2, 2] (0 = off)")

    @property
    def has_penalties(self) -> bool:
        """True when logits depend on the tokens seen so far. Meaningful after `with_defaults`."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def is_greedy(self) -> bool:
        """True when decoding is argmax (temperature 0). Meaningful after `with_defaults`."""
        return self.temperature == 0


def _as_list(stop: list[str] | str | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bad(field: str, value, rule: str):
    raise MoespecError(f"invalid sampling value: {field}={value!r} ({rule})")


def target_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The exact distribution a token is sampled from, float32, same shape as `logits` ([..., V]).

    temperature 0 gives a one-hot at the argmax (ties: lowest index, as torch.argmax). Otherwise
    softmax(logits / T) restricted by top-k (ties with the k-th value are kept, as transformers'
    TopKLogitsWarper) and then by top-p on the renormalised top-k distribution (the smallest set of most likely
    tokens whose mass reaches p, never empty), renormalised. top_k <= 0 and top_p >= 1 disable the filters.
    """
    # logits: [..., V] -> probs: [..., V]
    logits = logits.float()
    if temperature == 0:
        probs = torch.zeros_like(logits)
        return probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)

    scores = logits / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # [..., 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        scores = _top_p_filter(scores, top_p)
    return torch.softmax(scores, dim=-1)


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside the nucleus. scores: [..., V]."""
    # Stable descending sort: among equal scores the lower index ranks first, so the cut is deterministic.
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    sorted_probs = torch.softmax(sorted_scores, dim=-1)
    # Mass strictly above each token: a token is in the nucleus while that mass is still short of p.
    # The top token has 0 above it, so at least one token always survives.
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_remove = mass_above >= top_p
    remove = torch.zeros_like(sorted_remove).scatter(-1, order, sorted_remove)
    return scores.masked_fill(remove, float("-inf"))


def apply_penalties(logits: torch.Tensor, prompt: list[int], outputs: list[list[int]], p: SamplingParams
                    ) -> torch.Tensor:
    """The logits with p's penalties applied; row n is the next-token logits after prompt + outputs[n].

    logits: [N, V] -> [N, V] float32. Repetition penalty first (tokens of the prompt or of outputs[n]), then
    frequency and presence penalties (tokens of outputs[n] only), as vLLM does; then sampling as usual.
    """
    logits = logits.float()
    V = logits.shape[-1]
    counts = torch.stack([torch.bincount(torch.tensor(o, dtype=torch.long), minlength=V)[:V] for o in outputs])
    counts = counts.to(logits.device, torch.float32)                                   # [N, V]
    if p.repetition_penalty != 1:
        seen = counts > 0
        if prompt:
            seen |= torch.bincount(torch.tensor(prompt, dtype=torch.long), minlength=V)[:V].to(seen.device) > 0
        rp = p.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    if p.frequency_penalty or p.presence_penalty:
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return logits.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
    histories: list[tuple[list[int], list[int]]] | None = None, failed: list | None = None
) -> torch.Tensor:
    """Pick one token per row. logits: [B, V]; returns [B] int64.

    Greedy rows take the argmax and consume no randomness. Other rows draw from `target_probs` with their own
    generator, so a sequence's samples depend only on its seed, not on what else is in the batch.
    `params` must have been through `with_defaults`. histories[b] = (prompt ids, output ids) of row b, needed
    by rows with penalties (`apply_penalties`). A row whose distribution is not a distribution (NaN or infinite
    logits) is an error; with a `failed` list it is appended there as (row, message), its token is 0, and the
    other rows are sampled as usual.
    """
    if logits.dim() != 2 or len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(
            f"sample: logits {tuple(logits.shape)} needs one params and one generator per row, "
            f"got {len(params)} and {len(generators)}"
        )
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature is None or p.top_k is None or p.top_p is None:
            raise ValueError("sample: SamplingParams must be resolved with with_defaults() first")
        lg = logits[row]
        if p.has_penalties:
            if histories is None:
                raise ValueError("sample: rows with penalties need their histories")
            lg = apply_penalties(lg[None], histories[row][0], [histories[row][1]], p)[0]
        try:
            if not bool(torch.isfinite(lg).all()):
                raise MoespecError("the model produced non-finite logits (NaN or infinity) for this sequence")
            if p.is_greedy:
                out[row] = lg.argmax()
            else:
                probs = target_probs(lg, p.temperature, p.top_k, p.top_p)
                out[row] = torch.multinomial(probs, 1, generator=gen)[0]
        except (MoespecError, RuntimeError) as e:
            if failed is None:
                raise
            failed.append((row, str(e)))
            out[row] = 0
    return out


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for one sequence. With no seed it is seeded from torch's default RNG, so
    `torch.manual_seed` still makes unseeded runs reproducible."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
