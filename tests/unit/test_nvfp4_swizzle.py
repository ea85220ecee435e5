"""128x4 scale swizzle of Blackwell block-scaled MMA: hand-checked offsets, loop reference,
round trip, padding."""
import pytest
import torch

from tensorrt_llm_dwdp.quant.nvfp4 import (
    swizzle_scales_128x4,
    swizzled_scale_offset,
    swizzled_scale_shape,
    unswizzle_scales_128x4,
)


@pytest.mark.parametrize(
    "row,col,cols,offset",
    [
        (0, 0, 4, 0),
        (0, 1, 4, 1),
        (1, 0, 4, 16),      # next row%32: +16
        (32, 0, 4, 4),      # next 32-row group inside the tile: +4
        (127, 3, 4, 31 * 16 + 3 * 4 + 3),
        (0, 4, 8, 512),     # second column tile
        (128, 0, 8, 1024),  # second row tile comes after both column tiles
        (161, 6, 7, 3 * 512 + 1 * 16 + 1 * 4 + 2),
    ],
)
def test_hand_checked_offsets(row, col, cols, offset):
    assert swizzled_scale_offset(row, col, cols) == offset


def _loop_reference(scale: torch.Tensor) -> torch.Tensor:
    """Slow scalar scatter per cuBLAS' 'block scaling factors layout' description."""
    rows, cols = scale.shape
    rows_pad, cols_pad = swizzled_scale_shape(rows, cols)
    out = torch.zeros(rows_pad * cols_pad, dtype=torch.uint8)
    col_tiles = cols_pad // 4
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * col_tiles + c // 4
            out[tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4] = scale[r, c]
    return out


@pytest.mark.parametrize("rows,cols", [(1, 1), (128, 4), (129, 5), (200, 7), (256, 8)])
def test_swizzle_matches_loop_reference_and_round_trips(rows, cols):
    gen = torch.Generator().manual_seed(rows * 31 + cols)
    # Values 1..120: a dropped or misplaced entry never collides with the zero padding.
    scale = torch.randint(1, 121, (rows, cols), dtype=torch.uint8, generator=gen)
    sw = swizzle_scales_128x4(scale)
    rows_pad, cols_pad = swizzled_scale_shape(rows, cols)
    assert sw.shape == (rows_pad * cols_pad,)
    assert torch.equal(sw, _loop_reference(scale))
    assert int((sw != 0).sum()) == rows * cols  # padding is zero, nothing lost
    assert torch.equal(unswizzle_scales_128x4(sw, rows, cols), scale)
    r = torch.arange(rows)[:, None].expand(rows, cols)
    c = torch.arange(cols)[None, :].expand(rows, cols)
    assert torch.equal(sw[swizzled_scale_offset(r, c, cols)], scale)


def test_batched_float8_swizzle():
    gen = torch.Generator().manual_seed(7)
    bits = torch.randint(1, 0x7E, (3, 130, 6), dtype=torch.uint8, generator=gen)
    scale = bits.view(torch.float8_e4m3fn)
    sw = swizzle_scales_128x4(scale)
    assert sw.dtype == torch.float8_e4m3fn and sw.shape == (3, 256 * 8)
    for e in range(3):
        assert torch.equal(sw[e].view(torch.uint8), swizzle_scales_128x4(bits[e]))
    back = unswizzle_scales_128x4(sw, 130, 6)
    assert back.dtype == torch.float8_e4m3fn and torch.equal(back.view(torch.uint8), bits)


def test_unswizzle_rejects_wrong_size():
    with pytest.raises(ValueError, match="last dim must be 512"):
        unswizzle_scales_128x4(torch.zeros(500, dtype=torch.uint8), 100, 3)
    with pytest.raises(ValueError, match="rows, cols"):
        swizzle_scales_128x4(torch.zeros(5, dtype=torch.uint8))
