"""Benchmark workloads: token-id prompts with per-row output lengths (greedy, ignore_eos)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Workload:
    name: str
    description: str
    prompts: list[list[int]]
    max_tokens: list[int]
    lora: list[str | None] | None = None  # adapter per row
    ignore_eos: bool = True  # False: rows stop at EOS (natural text); tokens counted as generated
    engine: dict = field(default_factory=dict)  # engine arguments this workload needs
    schemas: list[dict] | None = None  # W6: the JSON schema each row's output must follow

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)

    def optimal_hit_rate(self, block_size: int = 16) -> float:
        """The best prefix-cache hit rate any order could reach: every row reuses the longest
        full-block prefix it shares with any other row, except the first row of each prefix."""
        seen: dict[tuple[int, ...], None] = {}
        cached = 0
        for p in sorted(self.prompts):
            best = 0
            for k in range(1, (len(p) - 1) // block_size + 1):
                if tuple(p[:k * block_size]) in seen:
                    best = k * block_size
                else:
                    break
            cached += best
            for k in range(1, len(p) // block_size + 1):
                seen[tuple(p[:k * block_size])] = None
        return cached / self.input_tokens


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def w1_fixed(rows: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    return Workload("W1", "fixed lengths: input 128, output 128", [_tokens(rng, 128) for _ in range(rows)],
                    [128] * rows)


def w2_variable(rows: int, seed: int = 1) -> Workload:
    rng = random.Random(seed)
    prompts = [_tokens(rng, rng.randint(16, 512)) for _ in range(rows)]
    return Workload("W2", "variable lengths: input 16..512, output 16..256", prompts,
                    [rng.randint(16, 256) for _ in range(rows)])


def w3_shared_prefix(rows: int, num_prefixes: int = 4, prefix_len: int = 384, seed: int = 2) -> Workload:
    """A few long system prompts times many short questions, shuffled (as a dataset would come)."""
    rng = random.Random(seed)
    prefixes = [_tokens(rng, prefix_len) for _ in range(num_prefixes)]
    prompts = [prefixes[i % num_prefixes] + _tokens(rng, rng.randint(8, 48)) for i in range(rows)]
    rng.shuffle(prompts)
    return Workload("W3", f"shared prefixes: {num_prefixes} x {prefix_len}-token system prompts, "
                          "8..48-token questions, output 64", prompts, [64] * rows)


def w3s_short_outputs(rows: int, num_prefixes: int = 4, prefix_len: int = 320, seed: int = 5,
                      name: str = "W3s") -> Workload:
    """Many rows over a few long shared prefixes, shuffled, short outputs: decode steps where most of
    each row's context is a prefix shared with many others (what cascade attention is for). The
    prefixes depend on the seed only, so W3s-64 and W3s-256 share them."""
    rng = random.Random(seed)
    prefixes = [_tokens(rng, prefix_len) for _ in range(num_prefixes)]
    prompts = [prefixes[i % num_prefixes] + _tokens(rng, rng.randint(4, 16)) for i in range(rows)]
    rng.shuffle(prompts)
    return Workload(name, f"{rows} rows over {num_prefixes} x {prefix_len}-token shared prefixes, 4..16-token "
                          "questions, output 16", prompts, [16] * rows, engine=dict(max_num_seqs=max(256, rows)))


def decode_heavy(rows: int, seed: int = 3) -> Workload:
    """Large-batch decode: short prompts, every row decoding at once (batchgen alone: the MFU row)."""
    rng = random.Random(seed)
    return Workload("D", f"decode at batch {rows}: input 32, output 64", [_tokens(rng, 32) for _ in range(rows)],
                    [64] * rows)


NUM_ADAPTERS = 8


def w4_multi_lora(rows: int, seed: int = 4) -> Workload:
    """Rows spread over 8 LoRA adapters (round robin), input 64, output 64."""
    rng = random.Random(seed)
    return Workload("W4", f"multi-LoRA: {NUM_ADAPTERS} adapters (r=16, q/k/v/o/gate/up/down) mixed, "
                          "input 64, output 64", [_tokens(rng, 64) for _ in range(rows)], [64] * rows,
                    lora=[f"adapter{i % NUM_ADAPTERS}" for i in range(rows)])


_TEXTS = [
    "The committee met on Tuesday to review the annual budget, approve two new hires, and discuss the "
    "plan to renovate the library before the start of the autumn term.",
    "Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and water "
    "and, using sunlight, produce glucose and release oxygen into the air.",
    "To reset the router, unplug it for thirty seconds, plug it back in, wait for the status light to "
    "turn green, and then reconnect your devices to the network.",
    "Marie Curie was the first person to win Nobel Prizes in two different sciences, physics in 1903 "
    "and chemistry in 1911, for her research on radioactivity.",
]


def w5_input_grounded(rows: int, tokenizer, batch: int) -> Workload:
    """Rewrite/copy tasks whose answer repeats the input: where prompt lookup shines."""
    tasks = ["Repeat the following text exactly, word for word:", "Copy this paragraph without changes:"]
    prompts = []
    for i in range(rows):
        chat = [{"role": "user", "content": f"{tasks[i % 2]}\n\n{_TEXTS[i % len(_TEXTS)]}"}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return Workload(f"W5-b{batch}", f"input-grounded rewrites at batch {batch}, greedy, up to 96 tokens",
                    prompts, [96] * rows, ignore_eos=False, engine=dict(max_num_seqs=batch))


W6_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "email": {"type": "string", "maxLength": 24}}, "required": ["name", "age", "email"]},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 24},
                                      "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                      "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action"]},
                                                 "minItems": 1, "maxItems": 3}}, "required": ["title", "year", "genres"]},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                      "temp_c": {"type": "number", "minimum": -40, "maximum": 50},
                                      "sky": {"enum": ["clear", "cloudy", "rain", "snow"]}}, "required": ["city", "temp_c", "sky"]},
    {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                      "price": {"type": "number", "minimum": 0, "maximum": 1000},
                                      "in_stock": {"type": "boolean"}}, "required": ["sku", "price", "in_stock"]},
]
_W6_TASKS = ["a person", "a movie", "today's weather", "a product in a shop"]


def w6_json_schema(rows: int, tokenizer, batch: int = 64) -> Workload:
    """Chat rows asking for a JSON record, each with its own schema (4 kinds, round robin), sampled."""
    prompts, schemas = [], []
    for i in range(rows):
        k = i % len(W6_SCHEMAS)
        chat = [{"role": "user", "content": f"Describe {_W6_TASKS[k]} (example {i}) as a JSON object."}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
        schemas.append(W6_SCHEMAS[k])
    return Workload("W6", f"JSON-schema rows at batch {batch}: constrained vs the same rows unconstrained "
                          "(same token counts), temperature 1.0, up to 128 tokens", prompts, [128] * rows,
                    ignore_eos=False, engine=dict(max_num_seqs=batch, enable_prefix_caching=False), schemas=schemas)


def all_workloads(quick: bool, tokenizer=None) -> list[Workload]:
    if quick:
        out = [w1_fixed(8), w2_variable(8), w3_shared_prefix(8), w3s_short_outputs(16), decode_heavy(16),
               w4_multi_lora(8), w3s_short_outputs(8, name="W3s-64"), w3s_short_outputs(16, name="W3s-256")]
    else:
        out = [w1_fixed(64), w2_variable(64), w3_shared_prefix(64), w3s_short_outputs(192), decode_heavy(256),
               w4_multi_lora(64), w3s_short_outputs(64, name="W3s-64"), w3s_short_outputs(256, name="W3s-256")]
    if tokenizer is not None:
        out += [w5_input_grounded(2 if quick else 4, tokenizer, 1), w5_input_grounded(8 if quick else 64, tokenizer, 64)]
        out.append(w6_json_schema(16 if quick else 64, tokenizer))
    return out
