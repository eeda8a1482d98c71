"""Build every C++ CPU kernel now, into torch's extension cache: `python -m batchgen.kernels.build`.

`make install` runs it, so that the first job does not wait ~25 s on the compiler. It never fails:
where a kernel cannot be built (no compiler, no headers) it says so and the torch path runs instead.
"""

from __future__ import annotations

import logging
import sys


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    from . import cpu_amx_linear, cpu_avx2_linear, cpu_decode_attention, cpu_decoder, cpu_lora, cpu_moe, cpu_ops
    from ._cpu_build import build_directory

    for module in (cpu_ops, cpu_decode_attention, cpu_lora, cpu_moe, cpu_amx_linear, cpu_avx2_linear, cpu_decoder):
        built = module.load()
        name = module.__name__.rsplit(".", 1)[-1]
        if built is None:
            print(f"{name}: not built (the torch path runs instead)", file=sys.stderr)
        else:
            print(f"{name}: built, in {build_directory(built.__name__)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
