"""Triton kernels for batchgen, each with a plain torch reference beside it (`<name>` / `<name>_ref`).

This package imports nothing from batchgen. Conventions shared by every kernel (attention, norms,
rotary, and the LoRA shrink/expand kernels) so they compose on one flat batch:

- Token-major, unpadded: activations are `[tokens, ...]`; a batch of rows is described by
  `cu_seqlens` (int32, `[rows + 1]`, row r owns tokens `cu_seqlens[r]:cu_seqlens[r+1]`), per-row
  values (context lengths, adapter ids) are int32 `[rows]`.
- Any strides on inputs (views of a fused projection are fine); outputs are fresh contiguous
  tensors unless an `out=` is given. Accumulation is in fp32 whatever the storage dtype.
- The KV cache of a layer is `[2, num_blocks, block_size, kv_heads, head_dim]` (K then V); a slot is
  `block * block_size + offset`; block tables are int32 `[rows, max_blocks]`.
- Each launcher takes plain tensors and Python scalars; host-side maxima (longest row, longest
  context) may be passed in to avoid a device sync, else they are read from the tensors.

Kernels decide once, when their module is imported, whether they run compiled or under the Triton
interpreter: set `TRITON_INTERPRET=1` before importing them to run on CPU tensors (slow; for tests).
"""
