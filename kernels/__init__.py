"""batchgen's kernels, each with a plain torch reference beside it (`<name>` / `<name>_ref`).
This package imports nothing from batchgen.

Triton (GPU; on CPU only under the interpreter, for tests): store_kv, paged_attention, rms_norm,
rotary, lora_shrink_expand. C++ for the CPU forward (compiled on first use by `_cpu_build`, off
with `BATCHGEN_CPU_KERNELS=0`): cpu_ops (fused RMSNorm, SiLU-and-mul, RoPE, argmax),
cpu_decode_attention (one-token rows; separate K and V caches, int64 tables), cpu_lora (a slot per
token rather than segments), cpu_amx_linear (bf16 linears on AMX tiles, weights pre-packed). Conventions shared by the Triton kernels so they compose on one flat
batch (the C++ ones follow them except where their docstrings say):

- Token-major, unpadded: activations are `[tokens, ...]`; a batch of rows is described by
  `cu_seqlens` (int32, `[rows + 1]`, row r owns tokens `cu_seqlens[r]:cu_seqlens[r+1]`), per-row
  values (context lengths, adapter ids) are int32 `[rows]`.
- Any strides on inputs (views of a fused projection are fine); outputs are fresh contiguous
  tensors unless an `out=` is given, except for the kernels that update in place by design
  (store_kv into the cache, lora_expand into y, rotary with `inplace=True`). Accumulation is in
  fp32 whatever the storage dtype.
- The KV cache of a layer is `[2, num_blocks, block_size, kv_heads, head_dim]` (K then V); a slot is
  `block * block_size + offset`; block tables are int32 `[rows, max_blocks]`.
- Each launcher takes plain tensors and Python scalars; host-side maxima (longest row, longest
  context) may be passed in to avoid a device sync, else they are read from the tensors.

Kernels decide once, when their module is imported, whether they run compiled or under the Triton
interpreter: set `TRITON_INTERPRET=1` before importing them to run on CPU tensors (slow; for tests).
"""
