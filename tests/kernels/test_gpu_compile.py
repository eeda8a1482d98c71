"""The kernels compile for an NVIDIA GPU (sm_90), checked here without one (see gpu_compile_check.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_sm90():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton has no NVIDIA backend here: {e}")
    script = Path(__file__).with_name("gpu_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script), "90"], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") >= 11 and "SPLIT=True" in proc.stdout, proc.stdout
    assert "ok _lora_shrink_kernel" in proc.stdout and "ok _lora_expand_kernel" in proc.stdout, proc.stdout
