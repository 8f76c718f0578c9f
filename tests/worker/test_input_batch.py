"""The step's host arrays for logit_bias and min_tokens: fixed-width per-request lists whose
pads change nothing, and a hold flag per step from the row's output count."""

import numpy as np

from lora_jax.sampling_params import MAX_HELD_TOKEN_IDS, MAX_LOGIT_BIAS
from lora_jax.worker.input_batch import RowInput, RowSampling, ShapeLadder, build, table_width


def test_bias_and_held_ids_are_padded_and_a_row_holds_while_under_min_tokens():
    s = RowSampling(bias_ids=(5, 9), bias=(1.5, -100.0), min_tokens=3, held_ids=(2, 7))
    rows = [RowInput(tokens=[4], start=3, row=r, block_table=[r], sampling=s, counter=c)
            for r, c in ((0, 2), (1, 3))]
    rows.append(RowInput(tokens=[4, 5], start=0, row=2, block_table=[2]))  # plain greedy
    shape = ShapeLadder(64, 4, 2).fit(rows)
    cols = build(rows, shape, block_size=16, num_blocks=4,
                 table_pages=table_width(64, 16)).columns
    r = shape.requests
    assert cols["bias_ids"].shape == cols["bias"].shape == (r, MAX_LOGIT_BIAS)
    assert cols["held_ids"].shape == (r, MAX_HELD_TOKEN_IDS)
    # Output 3 (counter 2) is held, output 4 (counter 3) no longer; padding never holds.
    assert cols["hold"].tolist() == [True, False] + [False] * (r - 2)
    for i in (0, 1):
        assert cols["bias_ids"][i, :3].tolist() == [5, 9, 0]
        assert cols["bias"][i, :3].tolist() == [1.5, -100.0, 0.0]
        assert cols["held_ids"][i, :3].tolist() == [2, 7, -1]
    assert not cols["bias_ids"][2:].any() and not cols["bias"][2:].any()
    assert (cols["held_ids"][2:] == -1).all() and (cols["bias"][:, 2:] == 0).all()
    np.testing.assert_array_equal(cols["bias_ids"][:, 2:], 0)
