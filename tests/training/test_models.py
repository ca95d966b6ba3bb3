"""Loading the model to fine-tune (lorakit.training.models): local directories and hub ids told apart, `~`
expanded, pickles never read, transformers' refusals as one error line, and the model's position limit."""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import finetune_args, write_jsonl
from safetensors.torch import load_file

import lorakit as lk
from lorakit.cli import main
from lorakit.training.loop import Trainer
from lorakit.training.models import load_model_and_tokenizer, local_model_dir, max_positions


def test_examples_are_cut_at_the_models_position_limit(tiny_llama, tmp_path):
    words = " ".join(["the cat sat on the mat"] * 30)  # 180 words, beyond the tiny model's 64 positions
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": words}] * 8)
    config = lk.TrainConfig(model=str(tiny_llama), data=str(data), out=str(tmp_path / "run"), max_length=256)
    trainer = Trainer(config)
    assert trainer.model.config.max_position_embeddings == 64
    assert [len(e.input_ids) for e in trainer.train_set.examples] == [64] * 8
    trainer.tokenizer.model_max_length = 16  # where the tokenizer's limit is the smaller one, it rules
    assert max_positions(trainer.model, trainer.tokenizer) == 16


def test_a_model_path_under_the_home_directory_is_expanded(tiny_llama, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_llama, target_is_directory=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    model, _ = load_model_and_tokenizer("~/models/tiny", "causal-lm", None)
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2", "org/model-v1.5_b"])
def test_a_hub_id_is_looked_up_on_the_hub_not_refused_as_a_missing_directory(tmp_path, monkeypatch, name):
    import transformers

    def offline(source, *args, **kwargs):  # stands in for the hub: this test never touches the network
        raise OSError(f"no network to fetch {source}")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    message = f"cannot load the model or tokenizer from {name}: no network to fetch {name}"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        load_model_and_tokenizer(name, "causal-lm", None)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gpt2", None),
        ("owner/name", None),
        ("./gpt2", Path("gpt2")),
        ("/abs/model", Path("/abs/model")),
        ("~/model", Path.home() / "model"),
        ("a/b/c", Path("a/b/c")),
        ("C:\\models\\x", Path("C:\\models\\x")),
        ("here", Path("here")),  # a hub-like name that exists on disk is the local directory
    ],
)
def test_local_model_dir_tells_local_paths_from_hub_ids(tmp_path, monkeypatch, name, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert local_model_dir(name) == expected


def test_a_model_in_pickle_format_is_refused_not_unpickled(tiny_llama, word_data, tmp_path, capsys, monkeypatch):
    import shutil

    model_dir = Path(shutil.copytree(tiny_llama, tmp_path / "pickled"))
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("a pickle was read"))
    assert main(finetune_args(model_dir, word_data, tmp_path / "run")) == 2
    assert f"lorakit: error: cannot load the model or tokenizer from {model_dir}" in capsys.readouterr().err


def test_a_config_transformers_rejects_is_one_error_line(tiny_llama, word_data, tmp_path, capsys):
    import shutil

    model_dir = Path(shutil.copytree(tiny_llama, tmp_path / "bad-config"))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_size": -3}))
    assert main(finetune_args(model_dir, word_data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit: error: cannot load the model or tokenizer from {model_dir}: ")
    assert "hidden size (-3)" in err and len(err.strip().splitlines()) == 1  # transformers' reason, on one line
