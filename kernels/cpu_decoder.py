"""A decode step's decoder layers in one C++ call (CPU, bf16, Llama-family layers on AMX tiles).

Semantics: `DecoderStack.forward` returns what the model's per-layer Python forward returns for a
decode-only step (batchgen/models/llama.py: `LlamaForCausalLM.forward` after the embedding): per
layer RMSNorm (with the residual add from the second layer on), the fused q/k/v projection, RoPE,
the new K/V into the cache, decode attention over the paged cache (over the layer's sliding window
if it has one; else the shared-prefix kernel when the step has cascade groups), the o projection, RMSNorm with the residual, gate/up with SwiGLU in
the epilogue, down; then hidden + residual. It calls the same kernels in the same order on the same
tensors, so its output is bit-identical to that path (tests/kernels/test_cpu_decoder.py).

Why: between the kernels the Python forward runs ~25 dispatched torch ops and wrapper calls a
layer, on one thread, while the other waits. In W3's decode steps the second thread sat idle ~1/3
of the time, ~25% of the run with the main thread in Python or torch's dispatcher rather than in a
kernel (perf, docs/PERFORMANCE.md). Here the glue is a few C++ lines a layer.

How: each kernel extension exports the addresses of its C++ entry points (`entry_points()`); this
module calls them directly, with the signatures declared below. The weights are bound once
(`DecoderStack(...)`); each step passes only its own tensors.
"""

from __future__ import annotations

import torch

from . import cpu_amx_linear, cpu_decode_attention, cpu_ops
from ._cpu_build import lazy_build

_SOURCE = r"""
// The kernels this forward calls, as their extensions define them (cpu_ops.py, cpu_amx_linear.py,
// cpu_decode_attention.py). A signature changed there must change here: the test compares this
// forward with the Python one, bit for bit.
using RmsNorm = std::vector<torch::Tensor> (*)(torch::Tensor, torch::Tensor, double, c10::optional<torch::Tensor>);
using Rotary = void (*)(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor);
using StoreKV = void (*)(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor);
using Linear = torch::Tensor (*)(torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t);
using GatedLinear = torch::Tensor (*)(torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t, bool);
using DecodeAttention = torch::Tensor (*)(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                          double, int64_t);
using CascadeAttention = torch::Tensor (*)(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                           double, torch::Tensor, torch::Tensor, torch::Tensor);

template <typename F>
static F entry(const std::unordered_map<std::string, int64_t>& kernels, const std::string& name) {
  auto it = kernels.find(name);
  TORCH_CHECK(it != kernels.end() && it->second != 0, "DecoderStack: no kernel entry point ", name);
  return reinterpret_cast<F>(it->second);
}

struct Layer {
  torch::Tensor input_norm, qkv, o, post_norm, gate_up, down;        // norm weights; packed AMX weights
  c10::optional<torch::Tensor> qkv_bias, o_bias, gate_up_bias, down_bias;  // fp32, or none
  int64_t window;  // sliding-window size (0: full attention)
};

struct DecoderStack {
  std::vector<Layer> layers;
  int64_t heads, kv_heads, head_dim, inter;
  double eps, scale;
  RmsNorm rms_norm;
  Rotary rotary;
  StoreKV store_kv;
  Linear linear;
  GatedLinear gated_linear;
  DecodeAttention decode_attention;
  CascadeAttention cascade_attention;

  // weights: 6 per layer (input norm, qkv, o, post-attention norm, gate_up, down); biases: 4 per layer
  // (qkv, o, gate_up, down; None where the layer has none); windows: 1 per layer. dims: heads,
  // kv_heads, head_dim, inter.
  DecoderStack(std::vector<torch::Tensor> weights, std::vector<c10::optional<torch::Tensor>> biases,
               std::vector<int64_t> windows, std::vector<int64_t> dims, double eps, double scale,
               std::unordered_map<std::string, int64_t> kernels)
      : heads(dims.at(0)), kv_heads(dims.at(1)), head_dim(dims.at(2)), inter(dims.at(3)), eps(eps), scale(scale) {
    TORCH_CHECK(weights.size() == 6 * windows.size() && biases.size() == 4 * windows.size(),
                "DecoderStack: 6 weights, 4 biases and a window per layer");
    for (size_t i = 0; i < windows.size(); ++i) {
      const auto* w = &weights[6 * i];
      const auto* b = &biases[4 * i];
      layers.push_back(Layer{w[0], w[1], w[2], w[3], w[4], w[5], b[0], b[1], b[2], b[3], windows[i]});
    }
    rms_norm = entry<RmsNorm>(kernels, "rms_norm");
    rotary = entry<Rotary>(kernels, "rotary_embedding_");
    store_kv = entry<StoreKV>(kernels, "store_kv");
    linear = entry<Linear>(kernels, "linear");
    gated_linear = entry<GatedLinear>(kernels, "gated_linear");
    decode_attention = entry<DecodeAttention>(kernels, "decode_attention");
    cascade_attention = entry<CascadeAttention>(kernels, "cascade_decode_attention");
  }

  // x [rows, hidden]: the embeddings of one token per row; cos, sin [max_pos, head_dim]; positions,
  // slot_mapping, ctx_lens [rows]; block_tables [rows, max_blocks]; kv_caches: one [2, blocks,
  // block_size, kv_heads, head_dim] per layer; cascade: (group rows, group starts, group blocks) or
  // empty. Returns the hidden states [rows, hidden] before the final norm.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                        torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor ctx_lens,
                        std::vector<torch::Tensor> kv_caches, std::vector<torch::Tensor> cascade) const {
    TORCH_CHECK(kv_caches.size() == layers.size(), "DecoderStack: one KV cache per layer");
    TORCH_CHECK(cascade.empty() || cascade.size() == 3, "DecoderStack: cascade is (rows, starts, blocks) or empty");
    const int64_t t = x.size(0), q_size = heads * head_dim, kv_size = kv_heads * head_dim;
    const int64_t hidden = x.size(1);
    torch::Tensor residual;
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& L = layers[i];
      torch::Tensor h;
      if (i == 0) {  // the embedding is the residual stream
        h = rms_norm(x, L.input_norm, eps, c10::nullopt)[0];
        residual = x;
      } else {
        auto hr = rms_norm(x, L.input_norm, eps, residual);
        h = hr[0];
        residual = hr[1];
      }
      const torch::Tensor qkv = linear(h, L.qkv, L.qkv_bias, q_size + 2 * kv_size);  // [t, q + 2 kv]
      const torch::Tensor q = qkv.narrow(1, 0, q_size).view({t, heads, head_dim});
      const torch::Tensor k = qkv.narrow(1, q_size, kv_size).view({t, kv_heads, head_dim});
      const torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({t, kv_heads, head_dim});
      rotary(q, k, cos, sin, positions);
      const torch::Tensor& cache = kv_caches[i];
      store_kv(k, v, cache, slot_mapping);
      const torch::Tensor k_cache = cache.select(0, 0), v_cache = cache.select(0, 1);
      const torch::Tensor o = cascade.empty() || L.window
          ? decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale, L.window)
          : cascade_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale, cascade[0], cascade[1], cascade[2]);
      h = linear(o.view({t, q_size}), L.o, L.o_bias, hidden);
      auto hr = rms_norm(h, L.post_norm, eps, residual);
      residual = hr[1];
      h = gated_linear(hr[0], L.gate_up, L.gate_up_bias, inter, true);  // [t, inter]
      x = linear(h, L.down, L.down_bias, hidden);
    }
    return x + residual;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<std::vector<torch::Tensor>, std::vector<c10::optional<torch::Tensor>>, std::vector<int64_t>,
                    std::vector<int64_t>, double, double, std::unordered_map<std::string, int64_t>>())
      .def("forward", &DecoderStack::forward);
}
"""

load = lazy_build("batchgen_cpu_decoder", _SOURCE, None)


def kernel_entry_points() -> dict[str, int] | None:
    """The C++ entry points of the kernels the stack calls, or None where one of them is not built."""
    modules = [cpu_ops.load(), cpu_amx_linear.load(), cpu_decode_attention.load()]
    if any(m is None for m in modules):
        return None
    points: dict[str, int] = {}
    for module in modules:
        points.update(module.entry_points())
    return points


def decoder_stack(weights: list[torch.Tensor], biases: list[torch.Tensor | None], windows: list[int], heads: int,
                  kv_heads: int, head_dim: int, inter: int, eps: float, scale: float):
    """The bound stack (`forward` as in the C++ above), or None where the kernels cannot be built."""
    module = load()
    points = kernel_entry_points()
    if module is None or points is None:
        return None
    return module.DecoderStack(weights, biases, windows, [heads, kv_heads, head_dim, inter], eps, scale, points)
