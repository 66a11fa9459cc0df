"""The glue-free mixers: layout independence, channels-last flow, TorchScript."""

import torch

from vmamba.layers import SS2D, BiMambaMixer
from vmamba.models.vmamba import VSSBlock


def test_ss2d_same_output_for_contiguous_and_channels_last_input():
    torch.manual_seed(0)
    mixer = SS2D(8, d_state=2).eval()
    x = torch.randn(2, 8, 5, 7)
    out = mixer(x)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(mixer(x.contiguous(memory_format=torch.channels_last)), out)


def test_vss_block_keeps_channels_last_and_values():
    torch.manual_seed(0)
    block = VSSBlock(8, mlp_ratio=2.0).eval()
    x = torch.randn(2, 8, 4, 6)
    out = block(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = x + block.mixer(block.norm1(x))
    expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(out, expected)


def test_mixers_script_with_torchscript():
    torch.manual_seed(0)
    vim = BiMambaMixer(16, d_state=4).eval()
    ss2d = SS2D(8, d_state=2).eval()
    x, grid = torch.randn(2, 7, 16), torch.randn(2, 8, 3, 5)
    torch.testing.assert_close(torch.jit.script(vim)(x), vim(x))
    torch.testing.assert_close(torch.jit.script(ss2d)(grid), ss2d(grid))
