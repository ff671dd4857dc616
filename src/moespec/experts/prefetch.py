"""Background expert loading: loader threads, load futures, and the next-layer predictor.

The cache decides *where* an expert goes (slot) and hands the loader `Load`s; loader threads read
them from the store into the slots, so compute and I/O overlap. Requests for one layer that are
queued together become one batch (store.load sorts them and reads runs of consecutive experts
with one preadv). Demand loads (a forward is waiting) are served before prefetches.

The compute thread waits on a Load before it touches the slot. A failed read marks the Load with
its exception; a loader that stopped, or a load that takes longer than the timeout, becomes a
MoespecError in the waiting thread: never a hang.

Device path (the seam for CUDA; nothing here needs it on CPU, where the fast pool is host
memory): with a CUDA fast pool the stores should read into pinned staging buffers and issue the
host-to-device copy on a dedicated copy stream, recording one CUDA event per Load; `Loader.wait`
would then make the compute stream wait on that event instead of blocking the host, and releasing
a chunk's locks would record an event on the compute stream that a later copy into the same slot
must wait on. Until then store.load's copy_ into a CUDA pool is synchronous: correct, no overlap.
"""
from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F

from ..errors import MoespecError


class Load:
    """One expert being read into one slot (a future the compute thread waits on)."""

    __slots__ = ("layer", "expert", "slot", "done", "error")

    def __init__(self, layer: int, expert: int, slot: int):
        self.layer, self.expert, self.slot = layer, expert, slot
        self.done = threading.Event()
        self.error: BaseException | None = None


class Loader:
    """`threads` daemon threads serving Loads from a demand queue and a prefetch queue."""

    def __init__(self, store, pools: dict, threads: int = 1, timeout_s: float = 60.0):
        self.store, self.pools, self.timeout_s = store, pools, timeout_s
        self._cv = threading.Condition()
        self._demand: list[Load] = []
        self._prefetch: list[Load] = []
        self._closed = False
        self.batches = 0
        self.loaded, self.load_s = 0, 0.0      # experts read and seconds spent reading them (all threads)
        self._threads = [threading.Thread(target=self._run, name=f"moespec-expert-loader-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, loads: list[Load], demand: bool) -> None:
        if not loads:
            return
        with self._cv:
            if self._closed:
                raise MoespecError("the expert loader is closed")
            (self._demand if demand else self._prefetch).extend(loads)
            self._cv.notify()

    def _take(self) -> list[Load]:
        """Every queued load of the layer most urgently needed (demand first, then oldest prefetch)."""
        layer = (self._demand or self._prefetch)[0].layer
        batch = [x for x in self._demand if x.layer == layer] + [x for x in self._prefetch if x.layer == layer]
        self._demand = [x for x in self._demand if x.layer != layer]
        self._prefetch = [x for x in self._prefetch if x.layer != layer]
        return batch

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._demand or self._prefetch or self._closed):
                    self._cv.wait()
                if not (self._demand or self._prefetch):
                    return
                batch = self._take()
            try:
                layer = batch[0].layer
                t = time.perf_counter()
                pool = self.pools[layer]
                self.store.load(layer, [x.expert for x in batch], pool, [x.slot for x in batch])
                pool.after_load([x.slot for x in batch])     # a pool's hook, before the load is marked done
                with self._cv:
                    self.batches += 1
                    self.loaded += len(batch)
                    self.load_s += time.perf_counter() - t
            except BaseException as e:          # handed to the waiting compute thread, never swallowed
                for x in batch:
                    x.error = e
            for x in batch:
                x.done.set()

    def seconds_per_expert(self) -> float | None:
        """Measured read time per expert (batched reads share their time), None before any load."""
        with self._cv:
            return self.load_s / self.loaded if self.loaded else None

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def wait(self, load: Load) -> None:
        """Block until `load` is done; raise MoespecError on failure, loader death or timeout."""
        deadline = time.monotonic() + self.timeout_s
        while not load.done.wait(0.05):
            if not self.alive():
                raise MoespecError(f"the expert loader stopped before loading expert {load.expert} of layer "
                                   f"{load.layer}")
            if time.monotonic() > deadline:
                raise MoespecError(f"loading expert {load.expert} of layer {load.layer} took more than "
                                   f"{self.timeout_s:g}s (is the offload device stalled?)")
        if load.error is not None:
            e = load.error
            msg = str(e) if isinstance(e, MoespecError) else f"{type(e).__name__}: {e}"
            raise MoespecError(f"loading expert {load.expert} of layer {load.layer} failed: {msg}") from e

    def close(self) -> None:
        """Finish queued loads, then join the threads."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=self.timeout_s)


class NextLayer:
    """Prefetch policy "next-layer" (mixtral-offloading, AdapMoE): the hidden state entering MoE
    layer i goes through the router of the next MoE layer; its top-k experts are loaded while
    layer i computes. Residual streams change slowly, so this guess is often right, but a wrong one
    costs a read and evicts an expert the cache would have kept: only guesses the next router gives at
    least `min_prob` are loaded (on the reference model with a small cache, loading every top-2 guess read
    more than LRU alone; loading only those >= 0.2, right far more often, read less than LRU alone)."""

    def __init__(self, routers: dict[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor]], top_k: int,
                 min_prob: float = 0.0):
        """routers: each MoE layer's router [E, D], or (router, bias [E]) for a biased one (gpt-oss)."""
        layers = sorted(routers)
        self.next = dict(zip(layers, layers[1:]))
        self.routers, self.top_k, self.min_prob = routers, top_k, min_prob

    def predict(self, layer: int, x: torch.Tensor) -> tuple[int, list[int]] | None:
        """x [N, D] -> (next MoE layer, its predicted experts, most router mass first), or None."""
        nxt = self.next.get(layer)
        if nxt is None:
            return None
        r = self.routers[nxt]
        router, bias = r if isinstance(r, tuple) else (r, None)
        probs = F.softmax(F.linear(x.float(), router, bias), dim=-1)                   # [N, E] (routers are float32)
        w, ids = torch.topk(probs, self.top_k, dim=-1)                                    # [N, K]
        w = torch.where(w >= self.min_prob, w, torch.zeros_like(w))                      # confident guesses only
        mass = torch.zeros(probs.shape[-1], device=probs.device).index_add_(0, ids.reshape(-1), w.reshape(-1))
        picked = (mass > 0).nonzero().squeeze(1)
        return nxt, picked[torch.argsort(mass[picked], descending=True)].tolist()
