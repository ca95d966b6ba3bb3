"""Where `extract` reads full weights from (lorakit.tools.sources): state dicts, .safetensors files, model
directories of one file or of shards with an index, and what a directory's config.json tells about its layers."""

import json
import re

import pytest
import torch
from helpers import build_tiny_gpt2
from safetensors.torch import save_file

from lorakit.tools.sources import TensorSource, meta_model, module_kinds, tied_embedding


def test_a_state_dict_gives_its_names_shapes_and_tensors():
    tensors = {"a.weight": torch.eye(3), "b.weight": torch.ones(2, 4)}
    source = TensorSource(tensors)
    assert source.names() == ["a.weight", "b.weight"]
    assert source.shape("b.weight") == (2, 4)
    assert source.get("a.weight") is tensors["a.weight"]


def test_a_file_and_a_directory_of_files_give_every_tensor_by_name(tmp_path):
    save_file({"a.weight": torch.eye(3), "b.weight": torch.ones(2, 4)}, tmp_path / "one.safetensors")
    single = TensorSource(tmp_path / "one.safetensors")
    assert sorted(single.names()) == ["a.weight", "b.weight"]
    assert single.shape("b.weight") == (2, 4) and torch.equal(single.get("a.weight"), torch.eye(3))
    (tmp_path / "dir").mkdir()
    save_file({"a.weight": torch.eye(3)}, tmp_path / "dir" / "x.safetensors")
    save_file({"c.weight": torch.zeros(5, 1)}, tmp_path / "dir" / "y.safetensors")
    directory = TensorSource(tmp_path / "dir")
    assert sorted(directory.names()) == ["a.weight", "c.weight"]
    assert directory.shape("c.weight") == (5, 1) and torch.equal(directory.get("a.weight"), torch.eye(3))


def write_shards(directory, weight_map=None):
    """Two shards and the index that says which holds which tensor."""
    directory.mkdir()
    save_file({"a.weight": torch.eye(3)}, directory / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.ones(2, 4)}, directory / "model-00002-of-00002.safetensors")
    weight_map = weight_map or {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_a_sharded_directory_is_read_through_its_index(tmp_path):
    source = TensorSource(write_shards(tmp_path / "model"))
    assert source.names() == ["a.weight", "b.weight"]
    assert source.shape("b.weight") == (2, 4)
    assert torch.equal(source.get("a.weight"), torch.eye(3)) and torch.equal(source.get("b.weight"), torch.ones(2, 4))


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ({"a.weight": "model-00002-of-00002.safetensors"}, "puts 'a.weight' in model-00002-of-00002.safetensors"),
        ({"a.weight": "../model-00001-of-00002.safetensors"}, "names a shard outside its directory"),
        ({"a.weight": 1}, 'has no "weight_map" object of tensor names to shard files'),
    ],
)
def test_an_index_that_does_not_fit_its_shards_is_refused_by_name(tmp_path, weight_map, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TensorSource(write_shards(tmp_path / "model", weight_map))


def test_a_missing_path_or_a_directory_without_weights_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        TensorSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \.safetensors weights"):
        TensorSource(tmp_path / "empty")


def test_a_saved_gpt2s_config_tells_conv1d_embedding_and_the_tied_embedding(tmp_path):
    build_tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    model = meta_model(tmp_path / "gpt2")
    assert all(p.is_meta for p in model.parameters())  # shapes only, no memory
    kinds = module_kinds(model)
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d"
    assert kinds["transformer.wte"] == kinds["transformer.wpe"] == "embedding"
    assert kinds["lm_head"] == "linear"
    assert tied_embedding(model) == "transformer.wte"


def test_without_a_usable_config_nothing_is_known_about_the_layers(tmp_path):
    assert meta_model(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["NoSuchModel"]}))
    assert meta_model(tmp_path) is None
    assert module_kinds(None) == {} and tied_embedding(None) is None
