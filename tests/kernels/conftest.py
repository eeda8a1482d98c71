"""Kernel tests: every Triton kernel against its torch reference, under the Triton interpreter on CPU
and compiled on CUDA when a GPU is at hand (the `device` fixture).

Triton decides interpreter-or-compiler when a @triton.jit function is *defined*, so the variable is
set before anything imports triton, every module of `batchgen.kernels` is imported (decorated) right here,
and the variable is then put back: other test directories and their subprocesses never see it.
On a CUDA machine the kernels compile (set TRITON_INTERPRET=1 yourself to interpret there too).
"""

import os

_SAVED = os.environ.get("TRITON_INTERPRET")
if _SAVED is None:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import importlib  # noqa: E402
import pkgutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import batchgen.kernels  # noqa: E402

for _mod in pkgutil.iter_modules(batchgen.kernels.__path__):
    try:  # decorate every kernel under the setting above
        importlib.import_module(f"batchgen.kernels.{_mod.name}")
    except Exception:  # noqa: BLE001 - a broken module fails in the tests that import it, not here
        pass

from batchgen.kernels._utils import interpreted  # noqa: E402
from batchgen.kernels.store_kv import _store_kv_kernel  # noqa: E402

INTERPRETED = interpreted(_store_kv_kernel)
_INTERPRET_VALUE = os.environ["TRITON_INTERPRET"]
if _SAVED is None:
    del os.environ["TRITON_INTERPRET"]

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="kernels are compiled (CUDA machine, or triton imported before this conftest)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _triton_interpret_env(monkeypatch):
    """The setting the kernels were built with, visible to the code under test while it runs."""
    monkeypatch.setenv("TRITON_INTERPRET", _INTERPRET_VALUE)


@pytest.fixture
def amx_pass():
    """The C++ attention module where its AMX passes can run here (else skip); left on afterwards."""
    from batchgen.kernels.cpu_decode_attention import load

    module = load()
    if module is None or not module.set_amx(True):
        pytest.skip("no AMX-BF16 tiles on this CPU (or build)")
    yield module
    module.set_amx(True)
