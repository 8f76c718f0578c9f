"""Every Pallas kernel compiles to sm_90a code without spills and at a reasonable occupancy, in
every dtype (scripts/gpu_compile_check.py).

Runs on any machine: Triton and its bundled ptxas compile the IR jax.export emits for CUDA.
Fails, naming the fix, when the installed Triton cannot read this jaxlib's IR.
"""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parents[2] / "scripts" / "gpu_compile_check.py"
_SPEC = importlib.util.spec_from_file_location("gpu_compile_check", _PATH)
check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(check)


@pytest.mark.parametrize("name", [case[0] for case in check.CASES])
def test_kernels_compile_for_h200_without_spills(name):
    problem = check.check_triton()
    if problem:
        pytest.fail(problem)
    cases = [case for case in check.CASES if case[0] == name]
    rows = check.run(True, check.DTYPES, cases)
    assert rows, f"{name} lowered to no Triton calls"
    assert {row["dtype"] for row in rows} == set(check.DTYPES)
    for row in rows:
        assert row["spill_bytes"] == 0, row
        assert 0 < row["registers"] <= check.MAX_REGS, row
        assert row["warps_per_sm"] >= check.MIN_WARPS_PER_SM, row
