"""rms_norm (plain and fused with the residual add) against its torch reference and batchgen's RMSNorm."""

import pytest
import torch

from batchgen.kernels.rms_norm import rms_norm, rms_norm_ref

# bf16/fp16: the interpreter rounds fp32 -> bf16 by truncation where GPUs round to nearest even,
# so half-precision results may differ by one unit in the last place.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 96, 576])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(device, dtype, hidden, with_residual):
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(9, hidden, generator=g) * 3).to(device, dtype)
    w = torch.randn(hidden, generator=g).to(device, dtype)
    res = torch.randn(9, hidden, generator=g).to(device, dtype) if with_residual else None
    out = rms_norm(x, w, 1e-6, res)
    ref = rms_norm_ref(x, w, 1e-6, res)
    if with_residual:
        torch.testing.assert_close(out[1].float(), ref[1].float(), **TOL[dtype])  # x + residual
        out, ref = out[0], ref[0]
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def test_rms_norm_in_place_and_strided_rows(device):
    """out= / residual_out= aliasing the inputs, and rows that are views into a wider buffer."""
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(5, 128, generator=g).to(device)
    x, w = buf[:, :64], torch.randn(64, generator=g).to(device)
    res = torch.randn(5, 64, generator=g).to(device)
    ref_out, ref_res = rms_norm_ref(x.clone(), w, 1e-5, res.clone())
    out, new_res = rms_norm(x, w, 1e-5, res, out=x, residual_out=res)
    assert out.data_ptr() == x.data_ptr() and new_res.data_ptr() == res.data_ptr()
    torch.testing.assert_close(x, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res, ref_res, atol=1e-6, rtol=1e-6)


def test_rms_norm_reference_is_batchgens_rmsnorm():
    from batchgen.models.llama import RMSNorm

    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 48)
    torch.testing.assert_close(rms_norm_ref(x, norm.weight.detach(), 1e-6), norm(x).detach())
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(norm.weight)
    torch.testing.assert_close(norm(x).detach(), hf(x).detach())  # the oracle itself
