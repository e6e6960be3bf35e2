"""Loading any run folder for inference: fine-tuned classifiers come back with their PEFT structure and weights."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import PHRASES, tiny_classifier_run, tiny_gpt_run

from minillm import MinillmError, runs
from minillm.data import pad_batch
from minillm.files import write_json
from minillm.finetune import encode_for_bert
from minillm.inference_runs import load_for_inference


@pytest.mark.parametrize("method", ["full", "head", "top", "adapters", "lora", "prompt"])
def test_a_classifier_run_loads_with_its_methods_structure_and_gives_the_saved_models_logits(tmp_path, method):
    folder, saved = tiny_classifier_run(tmp_path / method, method, seed=3)
    model, tokenizer, config = load_for_inference(folder)
    assert config["model"]["method"] == method and not model.training
    batch = pad_batch([ids for ids, _ in encode_for_bert(tokenizer, [(text, 0) for text in PHRASES[:5]], 32)], pad_id=0)
    with torch.no_grad():
        expected = saved(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loaded = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(loaded, expected)  # the same weights in the same structure: bit for bit


def test_an_older_classifier_run_takes_its_shape_from_its_init_run(tmp_path):
    folder, saved = tiny_classifier_run(tmp_path / "clf", "lora")
    init = tmp_path / "bert"
    init.mkdir()
    config = runs.read_config(folder)
    write_json(init / runs.CONFIG, {"model": {"type": "bert", **config["model"]["bert"]}})
    options = config["model"]["peft"]
    config["model"] = {"type": "bert-classifier", "init": str(init), "method": "lora"}  # what finetune wrote before
    config["train_config"] |= {"pooling": "mean", **options}
    write_json(folder / runs.CONFIG, config)
    model, _, _ = load_for_inference(folder)
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, saved(ids).logits)
    (init / runs.CONFIG).unlink()
    with pytest.raises(MinillmError, match="does not record the classifier's shape"):
        load_for_inference(folder)


def test_other_runs_load_through_load_run_and_a_wrong_kind_is_one_sentence(tmp_path):
    folder, saved = tiny_gpt_run(tmp_path / "gpt")
    model, _, _ = load_for_inference(folder, expect="gpt")
    assert torch.equal(model.lm_head.weight, saved.lm_head.weight)
    with pytest.raises(MinillmError, match="not a 'bert-classifier' one"):
        load_for_inference(folder, expect="bert-classifier")
    with pytest.raises(MinillmError, match="not a run folder|no config.json"):
        load_for_inference(tmp_path / "nowhere")
