"""Property tests of the radix prefix cache, driven through KVCacheManager (pure Python, no model).

Random sequences of operations — add requests whose tokens come from a tiny alphabet (so prefixes are
shared), compute them in chunks, append generated tokens, free them, and add big requests that force
eviction — must keep the pool's books straight. A shadow of the KV pool (block -> token per slot),
written whenever a request computes a position, checks that what the cache hands out holds the
request's own tokens and that no block in use or in the tree is ever overwritten.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from batchgen.cache.kv_manager import KVCacheManager, cdiv
from batchgen.request import Request
from batchgen.sampling import SamplingParams

BS = 4
NUM_BLOCKS = 12
PARAMS = SamplingParams(max_tokens=None)

# A few fixed stems (cut anywhere) plus a random tail: prefixes are shared often, at every depth.
STEMS = [[1, 2, 3, 1] * 5, [1, 2, 3, 1, 2, 2, 2, 2] * 3, [3, 3, 3, 3] * 5]
tokens_st = st.builds(
    lambda stem, cut, tail: (stem[:cut] + tail) or [1],
    st.sampled_from(STEMS), st.integers(0, 5 * BS), st.lists(st.sampled_from([1, 2, 3]), max_size=2 * BS),
)
lora_st = st.sampled_from([None, None, "A", "B"])


class RadixMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BS, enable_prefix_caching=True)
        self.radix = self.kv.radix
        self.live: dict[str, Request] = {}
        self.shadow: dict[int, list[int | None]] = {b: [None] * BS for b in range(NUM_BLOCKS)}
        self.next_id = 0
        self.fresh = 100  # tokens nobody shares, for requests that only add pressure

    # ---- helpers ----------------------------------------------------------------------------

    def _snapshot(self, req: Request):
        return (list(self.kv.pool.ref_cnt), list(self.kv.pool.free), list(self.radix.evictable),
                dict(self.radix.node_of_block), list(req.block_ids), req.num_computed_tokens,
                self.kv._tail.get(req.request_id))

    def _check_hits(self, req: Request, hits) -> None:
        assert len(hits) <= (req.num_tokens - 1) // BS
        root = self.radix.roots.get(req.lora)
        parent = root
        for d, node in enumerate(hits):
            want = req.token_ids[d * BS:(d + 1) * BS]
            assert node.parent is parent, "hits are not one path from the adapter's root"
            assert list(node.key) == want
            assert self.shadow[node.block] == want, f"block {node.block} does not hold the matched tokens"
            assert self.radix.node_of_block.get(node.block) is node
            parent = node

    def _allocate_and_compute(self, req: Request, chunk: int, hits=()) -> bool:
        remaining = req.num_tokens - req.num_computed_tokens - len(hits) * BS
        n = min(chunk, remaining)
        assert n >= 1
        before = self._snapshot(req)
        if not self.kv.allocate(req, n, list(hits)):
            assert self._snapshot(req) == before, "a failed allocate changed state"
            return False
        assert len(req.block_ids) == len(set(req.block_ids)), "a request holds a block twice"
        assert len(req.block_ids) * BS >= req.num_computed_tokens + n
        start = req.num_computed_tokens
        for pos in range(start, start + n):
            block = req.block_ids[pos // BS]
            assert self.kv.pool.ref_cnt[block] == 1, f"block {block} written while shared"
            assert not self.radix.is_cached(block), f"cached block {block} overwritten"
            self.shadow[block][pos % BS] = req.token_ids[pos]
        req.num_computed_tokens += n
        self.kv.cache_full_blocks(req)
        return True

    def _new_request(self, tokens, lora) -> Request:
        self.next_id += 1
        return Request(f"r{self.next_id}", tokens, PARAMS, eos_token_ids=[], lora=lora)

    # ---- rules ------------------------------------------------------------------------------

    @rule(tokens=tokens_st, lora=lora_st, chunk=st.integers(1, 6 * BS))
    def add(self, tokens, lora, chunk):
        req = self._new_request(tokens, lora)
        hits = self.kv.match_prefix(req)
        self._check_hits(req, hits)
        if self._allocate_and_compute(req, chunk, hits):
            self.live[req.request_id] = req

    @rule(length=st.integers(BS, NUM_BLOCKS * BS), lora=lora_st)
    def add_under_pressure(self, length, lora):
        """A request of unshared tokens big enough to need evictions (or to be refused)."""
        tokens = list(range(self.fresh, self.fresh + length))
        self.fresh += length
        req = self._new_request(tokens, lora)
        if self._allocate_and_compute(req, length):
            self.live[req.request_id] = req

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 3 * BS), generated=st.lists(st.sampled_from([1, 2, 3]), max_size=3))
    def step(self, data, chunk, generated):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live[rid]
        if req.num_computed_tokens == req.num_tokens:
            if not generated:
                return
            req.token_ids.extend(generated)  # sampled tokens, not in the KV cache yet
        self._allocate_and_compute(req, chunk)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live.pop(rid)
        self.kv.free(req)
        assert req.block_ids == []

    @rule(tokens=tokens_st, lora=lora_st)
    def probe_match(self, tokens, lora):
        req = self._new_request(tokens, lora)
        self._check_hits(req, self.kv.match_prefix(req))

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def ref_counts_match_holders(self):
        holders: dict[int, list[Request]] = {}
        for req in self.live.values():
            assert len(req.block_ids) == len(set(req.block_ids))
            assert len(req.block_ids) >= cdiv(req.num_computed_tokens, BS)
            for b in req.block_ids:
                holders.setdefault(b, []).append(req)
        for b in range(NUM_BLOCKS):
            assert self.kv.pool.ref_cnt[b] == len(holders.get(b, [])), f"block {b}: ref_cnt != live holders"
        for b, reqs in holders.items():
            assert len({r.lora for r in reqs}) == 1, f"block {b} shared across adapters"

    @invariant()
    def pool_partition(self):
        free = list(self.kv.pool.free)
        evictable = list(self.radix.evictable)
        in_use = [b for b in range(NUM_BLOCKS) if self.kv.pool.ref_cnt[b] > 0]
        assert len(free) == len(set(free)), "a block is twice on the free list"
        assert not set(free) & set(evictable)
        assert not set(free) & set(in_use), "a block in use is on the free list"
        assert not set(evictable) & set(in_use), "a block in use is evictable"
        assert len(free) + len(evictable) + len(in_use) == NUM_BLOCKS
        assert set(free) | set(evictable) | set(in_use) == set(range(NUM_BLOCKS))
        assert self.kv.num_free_blocks == len(free) + len(evictable)
        for b in evictable:
            assert self.kv.pool.ref_cnt[b] == 0 and b in self.radix.node_of_block

    @invariant()
    def tree_consistent(self):
        seen = 0
        for adapter, root in self.radix.roots.items():
            stack = [(root, [])]
            while stack:
                node, path_tokens = stack.pop()
                for key, child in node.children.items():
                    seen += 1
                    assert child.key == key and len(key) == BS and child.parent is node
                    assert child.depth == node.depth + 1
                    assert self.radix.node_of_block.get(child.block) is child, "node's block not in node_of_block"
                    assert self.shadow[child.block] == list(key), f"cached block {child.block} content changed"
                    if node is not root:
                        # every user of a child holds its parent
                        assert self.kv.pool.ref_cnt[node.block] >= self.kv.pool.ref_cnt[child.block]
                    for req in self.live.values():
                        if child.block in req.block_ids:
                            assert req.lora == adapter, "a request holds another adapter's block"
                            i = req.block_ids.index(child.block)
                            assert i == child.depth - 1
                            assert req.token_ids[:i * BS + BS] == path_tokens + list(key)
                    stack.append((child, path_tokens + list(key)))
        assert seen == len(self.radix.node_of_block), "node_of_block holds nodes not in the tree"

    @invariant()
    def live_requests_read_their_own_tokens(self):
        for req in self.live.values():
            for pos in range(req.num_computed_tokens):
                assert self.shadow[req.block_ids[pos // BS]][pos % BS] == req.token_ids[pos], \
                    f"{req.request_id}: KV at position {pos} was overwritten"

    def teardown(self):
        for req in list(self.live.values()):
            self.kv.free(req)
        self.live.clear()
        assert self.kv.num_free_blocks == NUM_BLOCKS
        assert all(c == 0 for c in self.kv.pool.ref_cnt)


RadixMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                          database=None, suppress_health_check=[HealthCheck.too_slow])
TestRadixMachine = RadixMachine.TestCase


# ---- adapters (deterministic) --------------------------------------------------------------------


def test_requests_with_different_lora_never_share_blocks():
    kv = KVCacheManager(32, BS)
    tokens = [1, 2, 3, 1] * 4  # 4 full blocks
    reqs = {}
    for lora in (None, "A", "B", None, "A"):
        req = Request(f"{lora}-{len(reqs)}", tokens + [9], PARAMS, [], lora=lora)
        hits = kv.match_prefix(req)
        assert kv.allocate(req, req.num_tokens - len(hits) * BS, hits)
        req.num_computed_tokens = req.num_tokens
        kv.cache_full_blocks(req)
        reqs[req.request_id] = req
    by_lora: dict = {}
    for req in reqs.values():
        by_lora.setdefault(req.lora, []).append(set(req.block_ids[:4]))
    for lora, sets in by_lora.items():
        assert all(s == sets[0] for s in sets), f"same adapter {lora!r} should share its prefix blocks"
    firsts = [sets[0] for sets in by_lora.values()]
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            assert not firsts[i] & firsts[j], "different adapters share KV blocks"
    assert reqs["None-3"].num_computed_tokens == 17 and kv.pool.ref_cnt[reqs["None-3"].block_ids[0]] == 2


def test_duplicate_block_computed_concurrently_is_deduplicated():
    kv = KVCacheManager(16, BS)
    tokens = [1, 2, 3, 1, 2, 3, 1, 2, 9]
    a = Request("a", tokens, PARAMS, [])
    b = Request("b", tokens, PARAMS, [])
    assert kv.allocate(a, 9) and kv.allocate(b, 9)  # both admitted before either cached anything
    a.num_computed_tokens = b.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    kv.cache_full_blocks(b)
    assert a.block_ids[:2] == b.block_ids[:2] and a.block_ids[2] != b.block_ids[2]
    assert kv.num_free_blocks == 16 - 4  # b's two duplicate blocks went back to the pool
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 16 and len(kv.radix.evictable) == 2
