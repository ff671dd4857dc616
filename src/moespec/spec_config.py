"""Speculative decoding settings (`SpecConfig`, vLLM's `--speculative-config`), checked as they are built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import MoespecError

if TYPE_CHECKING:
    from .models.budget import VerifyBudget


SHADOW_KINDS = ("shadow-int4", "shadow-int8")


DRAFT_REFRESH = ("hot-temporal", "hot-global", "random")    # the self drafter's draft-set policies (SpecMoE)


@dataclass
class SpecConfig:
    """Speculative decoding settings, vLLM style (`--speculative-config '{"method": "ngram", ...}'`).

    method: "ngram" (prompt lookup), "draft_model" (a small model with the same tokenizer, `model`; the bundled
        model's own draft when not given), "self" (the target drafts with `draft_experts` experts per layer: the
        resident ones when offloading, or shadow copies), or "auto": each step the controller picks among the self
        drafter (MoE models; shadow-int4 unless `draft_experts` says otherwise), the draft model (when `model` is
        given, or the bundled one) and prompt lookup, and the draft length, from what it measures (perf/chooser.py).
    num_speculative_tokens: draft length k per step, or "auto": the online controller (perf/controller.py)
        picks k in 1..max_speculative_tokens each step from measured acceptance and step costs, and
        switches to plain decoding while speculation would lose (one controller per batch size, kept
        across requests of an LLM). Greedy output is identical either way;
        seeded sampling is reproducible run to run only with a fixed k (auto's choices follow timings).
    prompt_lookup_max / prompt_lookup_min: the n-gram sizes matched, longest first.
    verify_budget / verify_budget_mass: LOSSY verification expert budget (MoE-Spec, models/budget.py): each MoE
        layer of a verification forward computes only the top-B experts by aggregate router probability, or
        the smallest set reaching that probability mass; None (default) = lossless. At most one of the two.
    budget_mode: "substitute" (re-pick a token's top-K inside the kept set) or "truncate" (drop its choices
        outside it). budget_decay: a draft token at depth d weighs budget_decay**d in the expert scores.
    tree: a static draft tree, branching factors per depth ([2, 2, 1, 1] or "2,2,1,1": 2 children at depth
        1, each with 2 at depth 2, then one each; at most 64 nodes; spec_decode/tree.py); the draft length is then
        the tree's depth. None (default): chains.
    """
    method: str = "ngram"
    num_speculative_tokens: int | str = 4
    max_speculative_tokens: int = 16         # the largest k "auto" may choose (16: at batch 1 over a throttled
                                             # tier, drafts of ~0.96 acceptance pay up to k = 12-16, docs/benchmarks.md)
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    model: str | None = None
    draft_experts: int | str | None = None  # self: experts per layer while drafting (default: resident / E/2), or
                                            # "shadow-int4" / "shadow-int8": low-bit copies of every expert
    draft_kv: str = "auto"                  # self: "shared" (drafts on the target's KV, every row in one forward
                                            # per position: spec_decode/self_shared.py), "own" (its own KV cache), "auto"
    draft_top_k: int | None = None          # self: experts per token while drafting (default: the model's K)
    draft_layers: int | None = None         # self: draft with the first L decoder layers only (default: all)
    draft_refresh: str = "hot-temporal"     # self, shared KV: how the N draft experts are chosen: "hot-temporal"
                                            # (last verification's), "hot-global" (a routing profile's, pinned),
                                            # "random" (spec_decode/self_shared.py)
    draft_profile: str | None = None        # the routing profile JSON "hot-global" ranks experts by
    draft_pin: bool = False                 # self, shared KV: pin the draft set in the expert cache
    draft_routing: str = "reroute"          # self: a token takes its top-K inside the draft set ("reroute"), or
                                            # an expert outside becomes its nearest one inside ("substitute")
    verify_budget: int | None = None        # lossy: experts per MoE layer per verification forward
    verify_budget_mass: float | None = None  # lossy: router probability mass kept per MoE layer, in (0, 1]
    budget_mode: str = "substitute"
    budget_decay: float = 1.0
    tree: list[int] | str | None = None     # static draft tree shape; validate() makes it a list

    METHODS = ("ngram", "draft_model", "self", "auto")

    @staticmethod
    def from_dict(d: dict) -> "SpecConfig":
        known = {"method", "num_speculative_tokens", "max_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model", "draft_experts",
                 "verify_budget", "verify_budget_mass", "budget_mode", "budget_decay", "tree",
                 "draft_top_k", "draft_layers", "draft_routing", "draft_kv", "draft_refresh", "draft_profile",
                 "draft_pin"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MoespecError(f"speculative config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return SpecConfig(**d).validate()

    def validate(self) -> "SpecConfig":
        if self.method not in self.METHODS:
            raise MoespecError(f"speculative method {self.method!r} is not available; choose one of: "
                               f"{', '.join(self.METHODS)}")
        if isinstance(self.draft_experts, str):
            d = self.draft_experts.strip()
            self.draft_experts = int(d) if d.isdigit() else d
            if isinstance(self.draft_experts, str) and self.draft_experts not in SHADOW_KINDS:
                raise MoespecError(f"draft_experts={d!r} must be a number of experts or one of: "
                                   f"{', '.join(SHADOW_KINDS)}")
        for name in ("draft_experts", "draft_top_k", "draft_layers"):
            v = getattr(self, name)
            if v is not None and not (name == "draft_experts" and isinstance(v, str)) and \
                    (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise MoespecError(f"{name}={v!r} must be a positive integer")
        self._validate_self_drafter()
        k = self.num_speculative_tokens
        if self.method == "auto":
            # The drafter is chosen per step from measurements (perf/chooser.py); its k too.
            if k not in ("auto", 4):
                raise MoespecError("speculative method 'auto' picks the draft length as well: drop "
                                   "num_speculative_tokens (--draft-len)")
            if self.tree is not None:
                raise MoespecError("speculative method 'auto' drafts chains: drop the tree")
            self.num_speculative_tokens = k = "auto"
            if self.draft_experts is None:
                self.draft_experts = "shadow-int4"
        if isinstance(k, str) and k.strip().isdigit():
            self.num_speculative_tokens = k = int(k)
        if k != "auto" and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64):
            raise MoespecError(f"num_speculative_tokens={k!r} must be an integer in [1, 64] or 'auto'")
        m = self.max_speculative_tokens
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= 64:
            raise MoespecError(f"max_speculative_tokens={m!r} must be an integer in [1, 64]")
        if self.tree is not None:
            from .spec_decode.tree import parse_shape
            try:
                self.tree = parse_shape(self.tree, "tree")
            except ValueError as e:
                raise MoespecError(str(e)) from None
            if k == "auto":
                raise MoespecError("tree and num_speculative_tokens 'auto' cannot be combined: a tree's depth is "
                                   "its draft length")
            self.num_speculative_tokens = len(self.tree)
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise MoespecError("prompt_lookup_min must be >= 1 and <= prompt_lookup_max, got "
                               f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        self._validate_budget()
        return self

    def _validate_self_drafter(self) -> None:
        """The options that shape the self drafter need it (method self), and take one of their values."""
        if self.draft_kv not in ("auto", "shared", "own"):
            raise MoespecError(f"draft_kv={self.draft_kv!r} is not one of: auto, shared, own")
        if self.draft_kv != "auto" and self.method != "self":
            raise MoespecError("draft_kv chooses the self drafter's KV cache: it needs method 'self' (--spec self)")
        if self.shadow is not None and self.method not in ("self", "auto"):
            raise MoespecError("shadow draft experts are the self drafter's: they need method 'self' (--spec self)")
        if self.draft_refresh not in DRAFT_REFRESH:
            raise MoespecError(f"draft_refresh={self.draft_refresh!r} is not one of: {', '.join(DRAFT_REFRESH)}")
        if (self.draft_refresh == "hot-global") != (self.draft_profile is not None):
            raise MoespecError("draft_refresh 'hot-global' ranks experts by a routing profile: give draft_profile "
                               "(--draft-profile, from `moespec profile`)" if self.draft_profile is None else
                               "draft_profile is what draft_refresh 'hot-global' ranks experts by: add it")
        if (self.draft_refresh != "hot-temporal" or self.draft_pin) and (self.method != "self" or self.shadow):
            raise MoespecError("draft_refresh and draft_pin choose the self drafter's cached draft experts: they need "
                               "method 'self' without shadow experts")
        if self.draft_routing not in ("substitute", "reroute"):
            raise MoespecError(f"draft_routing={self.draft_routing!r} is not one of: substitute, reroute")
        if (self.draft_top_k or self.draft_layers or self.draft_routing != "reroute") and self.method != "self":
            raise MoespecError("draft_top_k, draft_layers and draft_routing shape the self drafter's forward: they "
                               "need method 'self' (--spec self)")

    @property
    def shadow(self) -> str | None:
        """"int4" / "int8" when the self drafter drafts through low-bit copies of every expert, else None."""
        d = self.draft_experts
        return d.removeprefix("shadow-") if isinstance(d, str) else None

    @property
    def adaptive(self) -> bool:
        """The online controller picks k (num_speculative_tokens "auto")."""
        return self.num_speculative_tokens == "auto"

    @property
    def k_max(self) -> int:
        """The longest draft a step may use (sizes the KV slack and the per-position stats)."""
        return self.max_speculative_tokens if self.adaptive else self.num_speculative_tokens

    def _validate_budget(self) -> None:
        b, m = self.verify_budget, self.verify_budget_mass
        if b is not None and m is not None:
            raise MoespecError(f"verify_budget={b!r} and verify_budget_mass={m!r} were both given; "
                               "choose one (--verify-budget or --verify-budget-mass)")
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise MoespecError(f"verify_budget={b!r} must be a positive integer (experts per MoE layer)")
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1):
            raise MoespecError(f"verify_budget_mass={m!r} must be in (0, 1]")
        from .models.budget import MODES
        if self.budget_mode not in MODES:
            raise MoespecError(f"budget_mode={self.budget_mode!r} is not one of: {', '.join(MODES)}")
        d = self.budget_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise MoespecError(f"budget_decay={d!r} must be in (0, 1]")
        if b is None and m is None and (self.budget_mode != "substitute" or d != 1.0):
            raise MoespecError("budget_mode / budget_decay need a verify budget (verify_budget or verify_budget_mass)")

    def budget(self) -> VerifyBudget | None:
        """The verification expert budget as models/budget.py takes it, or None when verification is lossless."""
        if self.verify_budget is None and self.verify_budget_mass is None:
            return None
        from .models.budget import VerifyBudget
        return VerifyBudget(self.verify_budget, self.verify_budget_mass, self.budget_mode,
                            float(self.budget_decay)).validate()
