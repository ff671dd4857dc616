"""The expert cache: S slots per MoE layer in fast memory over a store that holds every expert.

`slot_of[layer, expert]` is the slot holding an expert (-1: not cached); `expert_in[slot]` is the
inverse. A slot may be evicted only if it is not pinned, not locked and not being loaded:

- locked: the MoE block computes a layer inside `chunks(layer, ids)`; every expert of the chunk
  it is computing holds a lock on its slot until the block asks for the next chunk (or closes the
  generator, also on errors), so no prefetch or other thread can take that slot meanwhile.
- chunking: when one forward needs more distinct experts in a layer than fit (S minus slots
  pinned by experts it does not need), the layer runs in chunks of at most that many experts,
  cached ones first; the block sums the chunks in a fixed order, so results stay bit-exact.
- loading: a slot whose Load is in flight is neither evicted nor used until the Load is done.

Counters (slots.py) count distinct experts per layer per forward; bytes_read = (misses +
prefetch_issued + preloaded) x expert bytes. Slot-table changes happen under one lock, any thread.
"""
from __future__ import annotations

import threading
import time
import weakref

import torch

from ..errors import MoespecError
from .policy import hot_set
from ..heap import return_large_frees
from .pool import PAGE, ExpertPool
from .pools import make_pool
from .prefetch import Load, Loader, NextLayer
from .slots import LayerSlots, check_layer, totals


class ExpertCache:
    """A provider for the MoE block (same protocol as ResidentExperts) over a slow store."""

    def __init__(self, store, moe_layers: list[int], slots: int, top_k: int, device="cpu", policy: str = "lru",
                 prefetch: str = "none", routers: dict[int, torch.Tensor] | None = None,
                 hot_profile: dict[int, list[float]] | None = None, io_threads: int = 1, io_timeout_s: float = 60.0,
                 prefetch_min_prob: float = 0.0, prepack: bool = False):
        lay = store.layout
        self.store, self.S, self.E, self.top_k = store, slots, store.num_experts, top_k
        self.policy_name, self.prefetch_name = policy, prefetch
        self.device = torch.device(device)
        self.expert_bytes = store.blob_bytes
        self.slot_of = torch.full((max(moe_layers) + 1, self.E), -1, dtype=torch.long)   # [layer, expert]
        align = PAGE if self.device.type == "cpu" else 0     # aligned CPU slots take O_DIRECT reads directly
        if prepack:                  # bf16 slots computed from prepacked copies (models/packed.PrepackingPool)
            return_large_frees()     # packed copies come and go: freed ones must leave the RSS
        self._pools = {i: make_pool(lay, slots, device, align, prepack) for i in moe_layers}
        self._st = {i: LayerSlots(slots, self.E, policy) for i in moe_layers}
        self._mu = threading.RLock()
        self._ensured: dict[int, list[int]] = {}
        self.loader = Loader(store, self._pools, io_threads, io_timeout_s)
        # The loader threads hold the store and pools, not the cache: when a cache is dropped without
        # close(), this stops them so its memory (and the store's) is freed too.
        self._finalizer = weakref.finalize(self, _shutdown, self.loader, store)
        self.predictor = NextLayer(routers, top_k, prefetch_min_prob) if prefetch == "next-layer" and routers else None
        self.debug_hook = None      # callable(event, layer, info): "ensure" after a chunk is ready, "evict"
        if policy == "static":
            for i in moe_layers:
                self._st[i].hot = set(hot_set(hot_profile[i], slots, top_k))
                self._fill(i, sorted(self._st[i].hot), "preloaded")

    # -- provider protocol --------------------------------------------------------------------------
    def pool(self, layer: int) -> ExpertPool:
        return self._pools[layer]

    def resident(self, layer: int) -> torch.Tensor:
        with self._mu:
            st = self._st[layer]
            ready = [e for s, e in enumerate(st.expert_in) if e >= 0 and (st.loads[s] is None or st.loads[s].done.is_set())]
            return torch.tensor(sorted(ready), dtype=torch.long)

    def hot(self, layer: int) -> list[int]:
        """The experts the static policy pins in this layer (none under LRU / LFU)."""
        return sorted(self._st[layer].hot)

    def cached(self, layer: int) -> torch.Tensor:
        """Experts holding a slot, loaded or loading: a forward using them reads nothing new (it may
        wait for a load in flight). Unlike resident(), it does not depend on I/O timing, so drafters
        that choose from it draft the same tokens however fast the store is."""
        with self._mu:
            self._reap(layer)
            return (self.slot_of[layer] >= 0).nonzero().squeeze(1)

    def observe(self, layer: int, x: torch.Tensor) -> None:
        if self.predictor is not None:
            guess = self.predictor.predict(layer, x)
            if guess is not None:
                self.prefetch(*guess)

    def chunks(self, layer: int, ids: torch.Tensor):
        """ids [N, K] -> yields (slots [N, K], mask [N, K] | None); see the module docstring."""
        need = torch.unique(ids).tolist()
        with self._mu:
            st = self._st[layer]
            fixed = st.pinned | st.hot
            first = self.S - len(fixed - set(need))
            if len(need) > first:
                st.n.chunked_layers += 1
                # Cached experts first: the first chunk costs no I/O and holds every pinned one we need.
                need.sort(key=lambda e: int(self.slot_of[layer, e]) < 0)
        if len(need) <= first:
            hold = self._acquire(layer, need)
            try:
                yield self._table(layer, ids.device)[ids], None
            finally:
                self._release(layer, hold)
            return
        rest = self.S - len(fixed)               # later chunks: every pinned expert still holds a slot
        start, size = 0, first
        while start < len(need):
            part = need[start:start + size]
            hold = self._acquire(layer, part)
            try:
                in_part = torch.zeros(self.E, dtype=torch.bool)
                in_part[part] = True
                table = self._table(layer, ids.device).clamp(min=0)   # others: any valid slot, masked out
                yield table[ids], in_part.to(ids.device)[ids]
            finally:
                self._release(layer, hold)
            start, size = start + size, rest

    def ensure(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Slots of ids, locked until release(layer). Fails if they do not fit (chunks() does not)."""
        need = torch.unique(ids).tolist()
        with self._mu:
            st = self._st[layer]
            if len(need) > self.S - len((st.pinned | st.hot) - set(need)):
                raise MoespecError(f"layer {layer} needs {len(need)} distinct experts but its cache has "
                                   f"{self.S} slots; compute it in chunks (ExpertCache.chunks)")
        self.release(layer)
        self._ensured[layer] = self._acquire(layer, need)
        return self._table(layer, ids.device)[ids]

    def release(self, layer: int) -> None:
        self._release(layer, self._ensured.pop(layer, []))

    # -- control --------------------------------------------------------------------------------------
    def pin(self, layer: int, experts: list[int]) -> None:
        """Keep these experts cached until unpin (loaded in the background if missing)."""
        with self._mu:
            st = self._st[layer]
            pins = st.pinned | set(experts)
            if len(pins | st.hot) > self.S - 1:
                raise MoespecError(f"cannot pin {len(pins | st.hot)} experts in layer {layer}: the cache has "
                                   f"{self.S} slots and needs one free slot for the others")
            st.pinned = pins
            self._fill(layer, sorted(set(experts)), "preloaded")

    def unpin(self, layer: int, experts: list[int]) -> None:
        with self._mu:
            self._st[layer].pinned -= set(experts)

    def prefetch(self, layer: int, experts: list[int], protect: set[int] | frozenset = frozenset()) -> int:
        """Best effort, no waiting: load these (most wanted first) into evictable slots only, never
        evicting an expert of `protect` (e.g. the ones a drafter computes with). Returns loads queued."""
        with self._mu:
            st = self._st[layer]
            keep = st.pinned | st.hot | (set(protect) - set(experts))
            return self._fill(layer, experts[:max(0, self.S - len(keep))], "prefetch_issued", set(protect))

    def _fill(self, layer: int, experts: list[int], counter: str, protect: set[int] = frozenset()) -> int:
        st = self._st[layer]
        loads = []
        self._reap(layer)                        # a failed load's expert must not look cached
        try:
            for e in experts:
                if self.slot_of[layer, e] >= 0:
                    continue
                s = self._victim(layer, protect=set(experts) | protect, wait=False)
                if s is None:
                    break
                loads.append(self._install(layer, e, s))
                setattr(st.n, counter, getattr(st.n, counter) + 1)
                if counter == "prefetch_issued":
                    st.prefetched.add(s)
            self.loader.submit(loads, demand=False)
            return len(loads)
        except BaseException:
            self._cancel(layer, loads)
            raise

    def _cancel(self, layer: int, loads: list[Load]) -> None:
        """Loads installed but never submitted: fail them so their slots empty instead of waiting forever."""
        for load in loads:
            if not load.done.is_set():
                load.error = MoespecError("cancelled before it was queued")
                load.done.set()
        self._reap(layer)

    # -- slots --------------------------------------------------------------------------------------
    def _table(self, layer: int, device) -> torch.Tensor:
        return self.slot_of[layer].to(device)         # no copy on CPU

    def _acquire(self, layer: int, experts: list[int]) -> list[int]:
        """Lock (and load if needed) every expert of `experts`; wait until all are usable."""
        st = self._st[layer]
        hold, waits, new = [], [], []
        try:
            with self._mu:
                self._reap(layer)                    # a failed load's expert must not look cached
                for e in experts:
                    s = int(self.slot_of[layer, e])
                    if s >= 0:
                        st.n.hits += 1
                        if st.loads[s] is None:           # loaded: a prepacking pool may pack it now
                            self._pools[layer].hit(s)
                        if s in st.prefetched:
                            st.n.prefetch_used += 1
                            st.prefetched.discard(s)
                    else:
                        s = self._victim(layer, protect=set(experts), wait=True)
                        new.append(self._install(layer, e, s))
                        st.n.misses += 1
                    st.locks[s] += 1
                    hold.append(s)
                    st.policy.used(s, e)
                    if st.loads[s] is not None:
                        waits.append(st.loads[s])
                self.loader.submit(new, demand=True)
                new = []
            if waits:
                t = time.perf_counter()
                try:
                    for load in waits:
                        self.loader.wait(load)       # raises if this load failed or stalled
                finally:
                    with self._mu:
                        st.n.stall_s += time.perf_counter() - t
                        self._reap(layer)
            if self.debug_hook is not None:
                self.debug_hook("ensure", layer, {"experts": list(experts), "slots": list(hold)})
            return hold
        except BaseException:
            with self._mu:
                self._release(layer, hold)
                self._cancel(layer, new)
            raise

    def _release(self, layer: int, hold: list[int]) -> None:
        with self._mu:
            st = self._st[layer]
            for s in hold:
                st.locks[s] -= 1

    def _install(self, layer: int, expert: int, slot: int) -> Load:
        st = self._st[layer]
        old = st.expert_in[slot]
        if old >= 0:
            if self.debug_hook is not None:
                self.debug_hook("evict", layer, {"expert": old, "slot": slot})
            self.slot_of[layer, old] = -1
            st.n.evictions += 1
            if slot in st.prefetched:
                st.n.prefetch_wasted += 1
                st.prefetched.discard(slot)
        st.expert_in[slot] = expert
        self.slot_of[layer, expert] = slot
        st.loads[slot] = load = Load(layer, expert, slot)
        st.n.bytes_read += self.expert_bytes
        return load

    def _victim(self, layer: int, protect: set[int], wait: bool) -> int | None:
        """A slot to (re)fill: empty first, else the policy's pick among evictable slots (None, or an
        error when wait, if every slot is locked, pinned or protected).

        For a demand load (wait) a slot whose load is still in flight is a candidate like any other; if
        picked, we wait for the load to land before reusing it: skipping it would make which experts stay
        cached depend on I/O timing. A prefetch (not wait) never waits: it runs on the drafting thread, and a
        prefetch that would stall drafting is worth less than the drafting it holds up, so slots still loading
        are not candidates (which prefetches land may then depend on I/O timing; what is computed never does)."""
        st = self._st[layer]
        self._reap(layer)
        fixed = st.pinned | st.hot
        free = [s for s in range(self.S) if st.locks[s] == 0 and st.expert_in[s] not in fixed
                and st.expert_in[s] not in protect and (wait or st.loads[s] is None)]
        if not free:
            if not wait:
                return None
            raise MoespecError(f"no evictable slot in layer {layer} ({self.S} slots: all locked or pinned)")
        empty = [s for s in free if st.expert_in[s] < 0]
        s = empty[0] if empty else st.policy.victim(free, st.expert_in)
        if st.loads[s] is not None:
            t = time.perf_counter()
            try:
                self.loader.wait(st.loads[s])
            except MoespecError:
                pass                                 # a failed prefetch: its slot is emptied below
            st.n.stall_s += time.perf_counter() - t
            self._reap(layer)
        return s

    def _reap(self, layer: int) -> None:
        """Retire finished loads. A failed one empties its slot: the forward waiting on it (if any)
        raises from Loader.wait; a failed prefetch nobody waits for is only counted (load_errors),
        and the next demand load of that expert reports the error if the store is really broken."""
        st = self._st[layer]
        for s, load in enumerate(st.loads):
            if load is None or not load.done.is_set():
                continue
            st.loads[s] = None
            if load.error is not None:
                self.slot_of[layer, load.expert] = -1
                st.expert_in[s] = -1
                st.prefetched.discard(s)
                st.n.load_errors += 1

    # -- stats and checks ---------------------------------------------------------------------------
    def stats(self) -> dict:
        """Summed counters (hits, misses, bytes_read, ..., hit_rate), settings, store stats, per_layer."""
        with self._mu:
            total = totals({i: st.n for i, st in self._st.items()})
        return {**total, "capacity": self.S, "num_experts": self.E, "expert_bytes": self.expert_bytes,
                "load_s_per_expert": self.loader.seconds_per_expert(),
                "policy": self.policy_name, "prefetch": self.prefetch_name, **self.store.stats()}

    def check(self, layer: int) -> None:
        """Assert the layer's slot table is consistent (a debug aid for tests and debug hooks). Under the
        lock: read while a prefetching thread installs experts, the table would look torn."""
        with self._mu:
            check_layer(self._st[layer], self.slot_of[layer], self.S, layer)

    def close(self) -> None:
        """Let queued loads finish, join the loader threads, close the store (idempotent)."""
        self._finalizer()


def _shutdown(loader: Loader, store) -> None:
    loader.close()
    store.close()
