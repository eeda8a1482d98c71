"""A dataset-generation pipeline: build prompts with `datasets`, generate with batchgen, load the results.

    python examples/generate_dataset.py                    # 24 rows, runs on a laptop CPU
    python examples/generate_dataset.py --rows 2000 --max-tokens 256 --out /data/run1

1. Prompts: a grid of (topic x task) chat instructions built as a datasets.Dataset and written as
   Parquet shards, the input format batchgen streams row group by row group.
2. Generation: a batchgen job over those shards through the Python API (`run_job`); the same job
   as a file runs with `batchgen run`. Rerunning resumes: committed rows are not generated again.
3. Results: the output parts load with datasets.load_dataset("parquet"); error rows are dropped
   and the rest saved as a chat SFT dataset (the user turn plus the generated assistant turn).
"""

from __future__ import annotations

import argparse
import itertools
import os

import datasets

from batchgen.job import run_job

TOPICS = ["volcanoes", "honeybees", "the moon", "photosynthesis", "compound interest", "the printing press",
          "black holes", "coral reefs", "vaccines", "the internet", "glaciers", "electric motors"]
TASKS = {
    "explain": "Explain {topic} to a ten-year-old in two sentences.",
    "facts": "Give three short facts about {topic}.",
    "haiku": "Write a haiku about {topic}.",
    "question": "Ask one thought-provoking question about {topic}.",
}
SYSTEM_PROMPT = "You are a friendly tutor. Be accurate and brief."


def build_prompts(num_rows: int) -> datasets.Dataset:
    grid = itertools.islice(itertools.product(TASKS.items(), TOPICS), num_rows)
    return datasets.Dataset.from_list([
        {"id": f"row-{i:06d}", "topic": topic, "task": task,
         "messages": [{"role": "user", "content": template.format(topic=topic)}]}
        for i, ((task, template), topic) in enumerate(grid)
    ])


def write_shards(ds: datasets.Dataset, directory: str, num_shards: int) -> str:
    os.makedirs(directory, exist_ok=True)
    num_shards = max(1, min(num_shards, len(ds)))
    for i in range(num_shards):
        ds.shard(num_shards, i, contiguous=True).to_parquet(os.path.join(directory, f"prompts-{i:05d}.parquet"))
    return os.path.join(directory, "*.parquet")


def job_spec(prompts: str, output: str, max_tokens: int) -> dict:
    """The job as a dict: exactly what a job.yaml holds (relative paths would be relative to the cwd)."""
    return {
        "model": {"path": "smollm2-135m", "dtype": "auto"},
        "input": {"path": prompts, "messages_column": "messages", "system_prompt": SYSTEM_PROMPT},
        "output": {"path": output, "commit_every_rows": 500, "keep_columns": ["topic", "task", "messages"]},
        "sampling": {"max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.95, "seed": 0},
        "engine": {"max_model_len": 1024},
    }


def to_sft(generations: datasets.Dataset) -> datasets.Dataset:
    ok = generations.filter(lambda row: row["error"] is None)
    return ok.map(
        lambda row: {"messages": row["messages"] + [{"role": "assistant", "content": row["generated_text"]}]},
        remove_columns=[c for c in ok.column_names if c not in ("id", "topic", "task", "messages")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", default="out/pipeline")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    out = os.path.abspath(args.out)

    prompts = write_shards(build_prompts(args.rows), os.path.join(out, "prompts"), args.shards)
    result = run_job(job_spec(prompts, os.path.join(out, "generations"), args.max_tokens), quiet=args.quiet)
    if result.exit_code:
        raise SystemExit(result.exit_code)  # stopped by a signal: rerun to resume

    generations = datasets.load_dataset("parquet", data_files=os.path.join(out, "generations", "*.parquet"),
                                        split="train")
    sft = to_sft(generations)
    sft.save_to_disk(os.path.join(out, "sft"))
    run = result.stats["run"]
    print(f"{generations.num_rows} rows generated ({generations.num_rows - sft.num_rows} errors), "
          f"{run['output_tokens_per_s']:.0f} tok/s, prefix-cache hit rate {run['prefix_cache_hit_rate']:.0%}")
    print(f"SFT dataset: {os.path.join(out, 'sft')} ({sft.num_rows} conversations)")
    if sft.num_rows:
        print("example:", sft[0]["messages"])


if __name__ == "__main__":
    main()
