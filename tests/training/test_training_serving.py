"""From training to serving: trained arrays go into the LLM without touching disk."""

import pytest
from helpers.checkpoints import write_checkpoint

from lora_jax import LLM, LoRARequest, SamplingParams
from lora_jax.lora.adapters import load_adapter
from lora_jax.tokenizer import TextTokenizer
from lora_jax.tools.tiny import char_tokenizer, config_dict, tiny_config
from lora_jax.training.datasets import tokenize
from lora_jax.training.trainer import AdapterSpec, LoRATrainer, TrainConfig
from models import PROJECTIONS, load_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def _learn(base, answer: str, seed: int):
    """An adapter that answers "ab=" with `answer` -> (trainer, its in-memory LoRAAdapter)."""
    model = load_llama(base)
    examples = tokenize([{"prompt": "ab=", "completion": answer}], TextTokenizer(base, 1), 2)
    trainer = LoRATrainer(model, [AdapterSpec("memo", target_modules=PROJECTIONS, seed=seed)],
                          TrainConfig(steps=40, batch_size=2, seq_len=8, learning_rate=3e-2))
    trainer.train([examples], progress=False)
    return trainer, trainer.adapters()[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = config_dict(tiny_config(hidden_size=32))
    base = write_checkpoint(tmp_path_factory.mktemp("base"), config)
    char_tokenizer().save(str(base / "tokenizer.json"))
    llm = LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=4)
    return base, llm, _learn(base, "xyz", seed=1), _learn(base, "qrs", seed=2)


def _answers(llm, requests):
    outs = llm.generate(["ab="] * len(requests), GREEDY, requests, use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_in_memory_adapter_serves_at_once_and_reregistering_swaps_weights_without_recompiling(
        setup):
    _, llm, (_, first), (_, second) = setup
    memo = LoRARequest("memo", 1, "memory://memo")
    llm.add_lora(memo, adapter=first)
    base_answer, answer = _answers(llm, [None, memo])
    assert answer == "xyz" and base_answer != "xyz"
    compiled = llm.engine.core.runner.compiled_count()
    llm.add_lora(memo, adapter=second)  # the same name and id, new weights: load in place
    assert _answers(llm, [None, memo]) == [base_answer, "qrs"]
    assert llm.engine.core.runner.compiled_count() == compiled


def test_an_adapter_saved_as_peft_serves_like_its_in_memory_arrays(setup, tmp_path):
    base, llm, (trainer, adapter), _ = setup
    [folder] = trainer.save(tmp_path, base_model_name_or_path=str(base))
    loaded = load_adapter(str(folder), base=trainer.model_config)
    assert loaded.modules.keys() == adapter.modules.keys()
    in_memory = LoRARequest("memo_memory", 3, "memory://memo_memory")
    llm.add_lora(in_memory, adapter=adapter)
    assert _answers(llm, [LoRARequest("memo_disk", 4, str(folder)), in_memory]) == ["xyz"] * 2
