"""LoRA slot bookkeeping (pure Python, no torch): which adapter is resident in which device slot.

The device holds at most `num_slots` adapters at once. A running request pins its adapter's slot;
an adapter with no pins stays resident (it may be asked for again) until a request for another
adapter needs its slot, least recently used first. Loading weights is not done here: `acquire`
records (slot, adapter) pairs that the runner must fill before the next forward (`take_loads`).
"""

from __future__ import annotations

from collections import OrderedDict


class LoRASlots:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.adapter_in: list[str | None] = [None] * num_slots  # slot -> resident adapter
        self.slot_of: dict[str, int] = {}  # resident adapter -> slot
        self.pins: list[int] = [0] * num_slots  # running requests using the slot
        self._idle: OrderedDict[int, None] = OrderedDict()  # resident, unpinned slots; LRU first
        self._loads: list[tuple[int, str]] = []  # assignments the runner has not loaded yet
        self.num_loads = 0  # adapters loaded into a slot so far (swaps + first loads)

    def can_acquire(self, adapter: str) -> bool:
        """True when `acquire(adapter)` would succeed now."""
        return adapter in self.slot_of or None in self.adapter_in or bool(self._idle)

    def acquire(self, adapter: str) -> int | None:
        """Pin a slot holding `adapter`, assigning one (empty first, else the least recently used
        idle one) when it is not resident. None when every slot is pinned by other adapters."""
        slot = self.slot_of.get(adapter)
        if slot is None:
            if None in self.adapter_in:
                slot = self.adapter_in.index(None)
            elif self._idle:
                slot, _ = self._idle.popitem(last=False)
                del self.slot_of[self.adapter_in[slot]]
                # A load of the evicted adapter still pending is moot now.
                self._loads = [(s, a) for s, a in self._loads if s != slot]
            else:
                return None
            self.adapter_in[slot] = adapter
            self.slot_of[adapter] = slot
            self._loads.append((slot, adapter))
            self.num_loads += 1
        self._idle.pop(slot, None)
        self.pins[slot] += 1
        return slot

    def release(self, adapter: str) -> None:
        """Drop one pin of `adapter`; with none left its slot becomes idle (most recently used)."""
        slot = self.slot_of[adapter]
        if self.pins[slot] <= 0:
            raise RuntimeError(f"LoRA adapter {adapter!r} released more often than acquired")
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            self._idle[slot] = None

    def slot(self, adapter: str) -> int:
        return self.slot_of[adapter]

    def take_loads(self) -> list[tuple[int, str]]:
        """(slot, adapter) pairs assigned since the last call, for the runner to load."""
        loads, self._loads = self._loads, []
        return loads
