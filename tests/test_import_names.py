"""batchgen's kernels are the package `batchgen.kernels`: nothing of ours may take the top-level name
`kernels`, which is Hugging Face's (recent transformers run `from kernels import ...` whenever that
package is installed, and pytest or `python -m` from the repository root put the root on sys.path)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_top_level_name_kernels_is_not_ours_from_the_repository_root():
    probe = ("import importlib.util, sys\n"
             "spec = importlib.util.find_spec('kernels')\n"
             "ours = spec is not None and spec.origin == sys.argv[1]  # a regular package from our directory\n"
             "print('ours' if ours else 'not ours')\n")
    out = subprocess.run([sys.executable, "-c", probe, str(ROOT / "kernels" / "__init__.py")], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "not ours"
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_kernels_import_as_batchgen_kernels_and_transformers_imports_beside_them():
    probe = ("from batchgen.kernels import cpu_ops, paged_attention\n"
             "from transformers import LlamaConfig, LlamaForCausalLM\n"
             "print(cpu_ops.silu_mul_ref.__module__, paged_attention.paged_attention_ref.__module__)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["batchgen.kernels.cpu_ops", "batchgen.kernels.paged_attention"]
