"""The benchmark's many-tenant workload: how requests pick adapters, and hot/cold latency."""

from collections import Counter

import pytest

from lora_jax.request import LoRARequest
from lora_jax.tools.tenancy import one_adapter, tenant_latency
from lora_jax.tools.workload import adapter_picks, parse_distribution, parse_targets


def test_zipf_picks_favour_the_first_adapters_and_round_robin_takes_turns():
    zipf = Counter(adapter_picks("zipf:1.1", 64, 2000, seed=0))
    assert zipf[0] > zipf[1] > zipf[10] and len(zipf) > 32
    assert adapter_picks("round-robin", 3, 7, seed=0) == [0, 1, 2, 0, 1, 2, 0]
    assert set(adapter_picks("uniform", 4, 200, seed=0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("text", ["zipf", "zipf:0", "zipf:x", "normal"])
def test_a_bad_distribution_is_named_with_the_choices(text):
    with pytest.raises(ValueError, match="round-robin, uniform or zipf:S"):
        parse_distribution(text)


def test_target_modules_are_checked():
    assert parse_targets("q_proj,v_proj") == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="unknown projection"):
        parse_targets("q_proj,qkv")


def test_hot_and_cold_tenants_get_their_own_latency():
    hot, cold = LoRARequest("h", 1, "/h"), LoRARequest("c", 2, "/c")
    loras = [hot] * 9 + [cold]
    times = {f"bench-{i}": [1.0, 1.5, 2.0] for i in range(9)} | {"bench-9": [3.0, 4.0]}
    report = tenant_latency(times, 0.0, loras)
    assert report["tenants"] == 2 and report["hot_tenants"] == 1
    assert report["hot"]["requests"] == 9 and report["hot"]["ttft_ms_p50"] == 1000.0
    assert report["hot"]["itl_ms_p99"] == 500.0
    assert report["cold"]["ttft_ms_mean"] == 3000.0 and report["cold"]["itl_ms_p50"] == 1000.0
    assert one_adapter([cold, None, hot, hot]) == [hot, None, hot, hot]
