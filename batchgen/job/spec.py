"""The job file: parse, validate and normalise job.yaml before any work starts.

Every error names the field path, what was found and what is allowed, e.g.
`input.format: 'xml' is not allowed; expected one of auto, parquet, jsonl, openai-batch, hf-dataset`.
Relative paths are made relative to the job file's directory, so a job runs the same from any cwd.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from batchgen.config import DTYPES, EngineConfig, SpeculativeConfig
from batchgen.sampling import SamplingParams

FORMATS = ("auto", "parquet", "jsonl", "openai-batch", "hf-dataset")
ON_ERROR = ("record", "skip", "fail")
# Columns every output part has; input columns of these names cannot be passed through.
OUTPUT_COLUMNS = ("id", "generated_text", "finish_reason", "num_prompt_tokens", "num_generated_tokens",
                  "num_cached_tokens", "error", "logprobs", "_shard_index", "_row_index")


class JobSpecError(ValueError):
    """A job file that cannot run; the message names the field path."""


@dataclass(frozen=True)
class ModelSpec:
    path: str = "smollm2-135m"  # alias, local HF directory or .gguf (made absolute when it is a local path)
    dtype: str = "auto"


@dataclass(frozen=True)
class InputSpec:
    paths: tuple[str, ...]  # globs, files, directories or fsspec URLs, relative ones resolved
    format: str = "auto"
    id_column: str | None = "id"
    prompt_column: str | None = "prompt"
    messages_column: str | None = "messages"
    system_prompt: str | None = None
    group_window: int = 100_000
    split: str | None = None  # hf-dataset: which split (default: the only one, or 'train')
    base_dir: str = "."  # the job file's directory: generated ids name shards relative to it
    # template variables for every row (e.g. {enable_thinking: false}); a row's chat_template_kwargs
    # column is merged over them
    chat_template_kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class OutputSpec:
    path: str
    commit_every_rows: int = 1000
    commit_every_seconds: float = 60.0
    keep_columns: str | tuple[str, ...] = "all"  # "all", "none" or the column names
    # (start, end) markers of the reasoning block (batchgen/reasoning.py): a reasoning_text column
    reasoning: tuple[str, str] | None = None


@dataclass(frozen=True)
class LoraSpec:
    """Multi-LoRA: each row's `column` names its adapter; null or "" means the base model."""
    adapters: dict[str, str]  # name -> PEFT adapter directory (made absolute when local)
    column: str = "lora"
    max_loras: int = 8  # adapters resident on the device at once
    max_lora_rank: int = 64


@dataclass(frozen=True)
class ShardingSpec:
    """How the rows are split: over the tasks of an array job, and over the GPUs of one task.

    Unset fields come from the command line (--task-index/--num-tasks/--data-parallel) or, inside a
    Slurm array, from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (see batchgen/job/tasks.py).
    """
    num_tasks: int | None = None
    task_index: int | None = None
    data_parallel: int | str | None = None  # "auto" (one engine per visible GPU) or a number of processes
    max_worker_restarts: int = 3  # times one data-parallel worker that died (kill -9, OOM) is restarted


@dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    input: InputSpec
    output: OutputSpec
    sampling: SamplingParams
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig arguments other than model/dtype
    on_error: str = "record"
    source: str | None = None  # the job file it came from, for messages
    speculative: dict[str, Any] | None = None  # SpeculativeConfig arguments; None: off
    lora: LoraSpec | None = None
    sharding: ShardingSpec = field(default_factory=ShardingSpec)
    task: str = "generate"  # or "score" (batchgen/job/score.py)
    score: Any = None  # batchgen.job.score.ScoreSpec for task: score

    def engine_config(self, **changes: Any) -> EngineConfig:
        args = dict(self.engine)
        if self.speculative is not None:
            args["speculative"] = dict(self.speculative)
        if self.lora is not None:
            args.update(lora_adapters=dict(self.lora.adapters), max_loras=self.lora.max_loras,
                        max_lora_rank=self.lora.max_lora_rank)
        if self.output.reasoning is not None:
            args["reasoning_parser"] = {"start": self.output.reasoning[0], "end": self.output.reasoning[1]}
        args.update(changes)
        return EngineConfig.from_kwargs(model=self.model.path, dtype=self.model.dtype, **args)

    @property
    def list_output(self) -> bool:
        """n > 1 makes generated_text a list of strings for every row (one schema per job)."""
        return self.sampling.n > 1

    @property
    def with_logprobs(self) -> bool:
        return self.sampling.logprobs is not None

    @property
    def read_columns(self) -> set[str] | None:
        """Input columns to pass through (ids, prompts and overrides are read anyway); None: all."""
        keep = self.output.keep_columns
        if keep == "all":
            return None
        columns = set(() if keep == "none" else keep)
        if self.task == "score":
            columns.add(self.score.completion_column)
        if self.lora is not None:
            columns.add(self.lora.column)  # read to route the row, whether or not it is kept
        return columns

    @classmethod
    def from_dict(cls, raw: Any, base_dir: str = ".", source: str | None = None) -> JobSpec:
        return _parse(raw, os.path.abspath(base_dir), source)


def load_spec(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a job file, apply `--set a.b=value` overrides and validate it."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise JobSpecError(f"job file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise JobSpecError(f"{path}: not valid YAML: {e}") from None
    raw = apply_overrides(raw if raw is not None else {}, overrides)
    return JobSpec.from_dict(raw, os.path.dirname(os.path.abspath(path)), source=path)


def apply_overrides(raw: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """`sampling.max_tokens=64` sets raw['sampling']['max_tokens'] = 64 (the value parsed as YAML)."""
    if not overrides:
        return raw
    if not isinstance(raw, dict):
        raise JobSpecError(f"the job file is a {_kind(raw)}, not a mapping of sections")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise JobSpecError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. sampling.max_tokens=64")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            raise JobSpecError(f"--set {item!r}: the value is not valid YAML: {e}") from None
        if isinstance(value, dict) and not text.lstrip().startswith("{"):
            value = text  # "Be brief: please" is a sentence with a colon, not a mapping
        node, parts = raw, key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise JobSpecError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a section")
        node[parts[-1]] = value
    return raw


# ---- parsing ------------------------------------------------------------------------------------

_SECTIONS = ("model", "input", "output", "sampling", "engine", "speculative", "lora", "sharding", "on_error",
             "task", "score")


def _parse(raw: Any, base_dir: str, source: str | None) -> JobSpec:
    top = _Section(raw, "", "the job file")
    model = top.section("model")
    inp = top.section("input", required=True)
    out = top.section("output", required=True)
    sampling = top.section("sampling")
    engine = top.section("engine")
    on_error = top.choice("on_error", ON_ERROR, "record")
    task = top.choice("task", ("generate", "score"), "generate")
    top.done(_SECTIONS)
    speculative = _speculative(top.get("speculative"), base_dir)
    lora = _lora(top.get("lora"), base_dir)
    sharding = _sharding(top.section("sharding"))

    model_spec = ModelSpec(path=_model_path(model.string("path", "smollm2-135m"), base_dir),
                           dtype=model.choice("dtype", DTYPES, "auto"))
    model.done(_MODEL_FIELDS)

    input_spec = InputSpec(
        paths=_input_paths(inp, base_dir),
        format=inp.choice("format", FORMATS, "auto"),
        id_column=inp.string("id_column", "id", nullable=True),
        prompt_column=inp.string("prompt_column", "prompt", nullable=True),
        messages_column=inp.string("messages_column", "messages", nullable=True),
        system_prompt=inp.string("system_prompt", None, nullable=True, empty_ok=True),
        group_window=inp.integer("group_window", 100_000, minimum=1),
        split=inp.string("split", None, nullable=True),
        base_dir=base_dir,
        chat_template_kwargs=_template_kwargs(inp.get("chat_template_kwargs")),
    )
    inp.done(_INPUT_FIELDS)
    if input_spec.prompt_column is None and input_spec.messages_column is None \
            and input_spec.format != "openai-batch":
        raise JobSpecError("input: prompt_column and messages_column are both null; "
                           "expected at least one column to read prompts from")

    output_spec = OutputSpec(
        path=_resolve(out.string("path", None, required=True), base_dir),
        commit_every_rows=out.integer("commit_every_rows", 1000, minimum=1),
        commit_every_seconds=out.number("commit_every_seconds", 60.0, minimum=0.0),
        keep_columns=_keep_columns(out),
        reasoning=_reasoning(out.get("reasoning")),
    )
    out.done(_OUTPUT_FIELDS)

    params = _sampling(sampling)
    engine_args = _engine(engine)
    score = _score(top.get("score"), task)
    return JobSpec(model_spec, input_spec, output_spec, params, engine_args, on_error, source,
                   speculative=speculative, lora=lora, sharding=sharding, task=task, score=score)


def _template_kwargs(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise JobSpecError(f"input.chat_template_kwargs: {value!r} is not allowed; expected a mapping of "
                           "template variables, e.g. {enable_thinking: false}")
    return dict(value)


def _reasoning(value: Any) -> tuple[str, str] | None:
    from batchgen.reasoning import parse_reasoning

    try:
        return parse_reasoning(value)
    except ValueError as e:
        raise JobSpecError(f"output.reasoning: {e}") from None


def _score(value: Any, task: str):
    from batchgen.job.score import parse_score

    if task != "score":
        if value is not None:
            raise JobSpecError("score: is only allowed with task: score")
        return None
    try:
        return parse_score(value)
    except ValueError as e:
        raise JobSpecError(str(e)) from None


def _input_paths(inp: _Section, base_dir: str) -> tuple[str, ...]:
    value = inp.get("path")
    allowed = "a path, glob or fsspec URL, or a list of them"
    if value is None:
        raise JobSpecError(f"input.path: missing; expected {allowed}")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise JobSpecError(f"input.path: an empty list is not allowed; expected {allowed}")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            where = "input.path" if not isinstance(value, list) else f"input.path[{i}]"
            raise JobSpecError(f"{where}: {item!r} is not allowed; expected {allowed}")
    return tuple(_resolve(p, base_dir) for p in items)


def _keep_columns(out: _Section) -> str | tuple[str, ...]:
    value = out.get("keep_columns", "all")
    allowed = "all, none, or a list of input column names"
    if value is None or value == "none":
        return "none"
    if value == "all":
        return "all"
    if not isinstance(value, list) or not all(isinstance(c, str) and c for c in value):
        raise JobSpecError(f"output.keep_columns: {value!r} is not allowed; expected {allowed}")
    clash = [c for c in value if c in OUTPUT_COLUMNS]
    if clash:
        raise JobSpecError(f"output.keep_columns: {clash[0]!r} is not allowed: it is an output column "
                           f"({', '.join(OUTPUT_COLUMNS)})")
    return tuple(dict.fromkeys(value))


def _sampling(section: _Section) -> SamplingParams:
    section.done(SamplingParams.field_names())
    try:
        return SamplingParams(**section.values)
    except (TypeError, ValueError) as e:
        raise JobSpecError(_field_error("sampling", "SamplingParams", str(e))) from None


# EngineConfig fields that have a section of their own in the job file.
_ELSEWHERE = {"model": "model.path", "dtype": "model.dtype", "speculative": "the speculative: section",
              "lora_adapters": "lora.adapters", "max_loras": "lora.max_loras", "max_lora_rank": "lora.max_lora_rank"}


def _engine(section: _Section) -> dict[str, Any]:
    for key, where in _ELSEWHERE.items():
        if key in section.values:
            raise JobSpecError(f"engine.{key}: not allowed here; set {where}")
    allowed = [f for f in EngineConfig.field_names() if f not in _ELSEWHERE]
    section.done(allowed)
    try:
        EngineConfig.from_kwargs(**section.values)
    except (TypeError, ValueError) as e:
        raise JobSpecError(_field_error("engine", "engine", str(e))) from None
    return dict(section.values)


_SPECULATIVE_FIELDS = [f.name for f in dataclasses.fields(SpeculativeConfig)]


def _speculative(raw: Any, base_dir: str) -> dict[str, Any] | None:
    """`speculative: {method: ngram, num_speculative_tokens: 3, ...}`; absent or null: off."""
    if raw is None:
        return None
    section = _Section(raw, "speculative")
    section.done(_SPECULATIVE_FIELDS)
    values = dict(section.values)
    if isinstance(values.get("draft_model"), str) and values["draft_model"]:
        values["draft_model"] = _model_path(values["draft_model"], base_dir)
    try:
        SpeculativeConfig(**values)
    except (TypeError, ValueError) as e:
        raise JobSpecError(_field_error("speculative", "speculative", str(e))) from None
    return values


_LORA_FIELDS = ["adapters", "column", "max_loras", "max_lora_rank"]


def _lora(raw: Any, base_dir: str) -> LoraSpec | None:
    """`lora: {adapters: {name: dir}, column: lora, max_loras: 8, max_lora_rank: 64}`; absent or null: off."""
    if raw is None:
        return None
    section = _Section(raw, "lora")
    section.done(_LORA_FIELDS)
    adapters = section.get("adapters")
    allowed = "a mapping of adapter name -> PEFT LoRA directory"
    if adapters is None:
        raise JobSpecError(f"lora.adapters: missing; expected {allowed}")
    if not isinstance(adapters, dict) or not adapters:
        raise JobSpecError(f"lora.adapters: {adapters!r} is not allowed; expected {allowed} (at least one)")
    resolved = {}
    for name, path in adapters.items():
        if not isinstance(name, str) or not name:
            raise JobSpecError(f"lora.adapters: the name {name!r} is not allowed; expected a non-empty string")
        if not isinstance(path, str) or not path:
            raise JobSpecError(f"lora.adapters.{name}: {path!r} is not allowed; "
                               "expected the path of a PEFT LoRA directory (relative to the job file)")
        resolved[name] = _resolve(path, base_dir)
    return LoraSpec(resolved, column=section.string("column", "lora"),
                    max_loras=section.integer("max_loras", 8, minimum=1),
                    max_lora_rank=section.integer("max_lora_rank", 64, minimum=1))


_SHARDING_FIELDS = ["num_tasks", "task_index", "data_parallel", "max_worker_restarts"]


def _sharding(section: _Section) -> ShardingSpec:
    section.done(_SHARDING_FIELDS)
    num_tasks = section.optional_integer("num_tasks", minimum=1)
    task_index = section.optional_integer("task_index", minimum=0)
    if num_tasks is not None and task_index is not None and task_index >= num_tasks:
        raise JobSpecError(f"sharding.task_index: {task_index} is not allowed; "
                           f"expected an integer in [0, {num_tasks}) (sharding.num_tasks is {num_tasks})")
    data_parallel = section.get("data_parallel")
    try:
        data_parallel = parse_data_parallel(data_parallel)
    except ValueError as e:
        raise JobSpecError(f"sharding.data_parallel: {e}") from None
    return ShardingSpec(num_tasks, task_index, data_parallel,
                        section.integer("max_worker_restarts", 3, minimum=0))


def parse_data_parallel(value: Any) -> int | str | None:
    """None, "auto" or an integer >= 1 (a numeric string from the command line too)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"{value!r} is not allowed; expected auto or an integer >= 1")


def _field_error(path: str, prefix: str, message: str) -> str:
    """Restate "SamplingParams.top_p=2 is invalid: must be in (0, 1]" as "sampling.top_p: 2 is not allowed; ..."."""
    m = re.match(rf"{prefix}\.(\w+)=(.*?) is invalid: (.*)", message)
    if not m:
        return f"{path}: {message}"
    name, found, reason = m.groups()
    return f"{path}.{name}: {found} is not allowed; {reason if reason.startswith('must') else 'expected ' + reason}"


def _model_path(path: str, base_dir: str) -> str:
    # An alias stays an alias; anything that exists beside the job file becomes an absolute path.
    candidate = _resolve(path, base_dir)
    return candidate if "://" not in candidate and os.path.exists(candidate) else path


def _resolve(path: str, base_dir: str) -> str:
    if "://" in path:
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


class _Section:
    """One mapping of the job file, read field by field so that leftovers can be reported."""

    def __init__(self, raw: Any, path: str, name: str | None = None):
        self.path = path
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise JobSpecError(f"{name or path}: a {_kind(raw)} is not allowed; expected a mapping")
        self.values = dict(raw)

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def section(self, key: str, required: bool = False) -> _Section:
        if required and key not in self.values:
            raise JobSpecError(f"{key}: missing; the job file needs an {key}: section")
        return _Section(self.values.get(key), self._where(key))

    def string(self, key: str, default: str | None, *, nullable: bool = False, required: bool = False,
               empty_ok: bool = False) -> str | None:
        if key not in self.values:
            if required:
                raise JobSpecError(f"{self._where(key)}: missing; expected a string")
            return default
        value = self.values[key]
        if value is None and nullable:
            return None
        if not isinstance(value, str) or (not value and not empty_ok):
            allowed = "a non-empty string" + (" or null" if nullable else "")
            raise JobSpecError(f"{self._where(key)}: {value!r} is not allowed; expected {allowed}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.values.get(key, default)
        if value not in choices:
            raise JobSpecError(f"{self._where(key)}: {value!r} is not allowed; expected one of {', '.join(choices)}")
        return value

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        value = self.values.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise JobSpecError(f"{self._where(key)}: {value!r} is not allowed; expected an integer >= {minimum}")
        return value

    def optional_integer(self, key: str, *, minimum: int) -> int | None:
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise JobSpecError(f"{self._where(key)}: {value!r} is not allowed; expected an integer >= {minimum} or null")
        return value

    def number(self, key: str, default: float, *, minimum: float) -> float:
        value = self.values.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
            raise JobSpecError(f"{self._where(key)}: {value!r} is not allowed; expected a number >= {minimum:g}")
        return float(value)

    def done(self, known: list[str] | tuple[str, ...]) -> None:
        """Reject fields nobody asked for: a typo must not silently fall back to a default."""
        for key in self.values:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                did = f" (did you mean {hint[0]}?)" if hint else ""
                raise JobSpecError(f"{self._where(str(key))}: unknown field{did}; expected one of {', '.join(known)}")

_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelSpec)]
_INPUT_FIELDS = ["path", "format", "id_column", "prompt_column", "messages_column", "system_prompt",
                 "group_window", "split", "chat_template_kwargs"]
_OUTPUT_FIELDS = [f.name for f in dataclasses.fields(OutputSpec)]


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), type(value).__name__)
