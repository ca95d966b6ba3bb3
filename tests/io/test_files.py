"""Reading and writing JSON and safetensors (lorakit.io.files): one ValueError naming the file for anything
unreadable, whichever part of lorakit reads it, and files written with the permissions of a plain open."""

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lorakit as lk
import lorakit.engine.peft_format
from lorakit.io.files import open_safetensors, read_json_object, read_safetensors, write_safetensors
from lorakit.io.matrices import read_matrices
from lorakit.tools.sources import TensorSource

WEIGHTS = "adapter_model.safetensors"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_every_safetensors_reader_refuses_a_bad_file_with_the_same_error_naming_it(tmp_path, damage):
    """Adapter weights, extract's model files and `lorakit rank` all read .safetensors through one helper."""
    path = tmp_path / WEIGHTS
    save_file({"a": torch.eye(4)}, path)
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 64 if damage == "garbage" else data[: len(data) // 2])
    message = re.escape(f"{path} is not a readable safetensors file: ")
    for read in (
        lambda: lorakit.engine.peft_format.read_adapter_weights(tmp_path),
        lambda: TensorSource(path),
        lambda: read_matrices(path),
    ):
        with pytest.raises(ValueError, match=message):
            read()


def test_saved_files_get_the_permissions_of_a_plain_open(tmp_path):
    import stat

    (tmp_path / "plain").write_text("x")
    model = lk.inject(nn.Sequential(nn.Linear(4, 3)), lk.LoraConfig(r=2, target_modules=["0"]))
    saved = lk.save_adapter(model, tmp_path / "adapter")
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(saved / "adapter_model.safetensors") == mode(saved / "adapter_config.json") == mode(tmp_path / "plain")


def test_read_json_object_returns_the_object_in_the_file(tmp_path):
    (tmp_path / "a.json").write_text('{"r": 2, "targets": ["q", "v"]}')
    assert read_json_object(tmp_path / "a.json") == {"r": 2, "targets": ["q", "v"]}


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"r": 2,', "is not valid JSON"),
        (b"\xff\xfe{}", "is not valid JSON"),  # not UTF-8
        (b"[1, 2]", "must hold a JSON object"),
        (b'"text"', "must hold a JSON object"),
    ],
)
def test_read_json_object_refuses_bad_json_or_a_non_object_naming_the_file(tmp_path, content, message):
    (tmp_path / "a.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'a.json'} ") + message):
        read_json_object(tmp_path / "a.json")


def test_written_safetensors_read_back_bit_for_bit_with_pt_metadata(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
    write_safetensors(tensors, tmp_path / "t.safetensors")
    read = read_safetensors(tmp_path / "t.safetensors")
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # what PEFT and transformers write


def test_a_missing_safetensors_file_is_the_same_value_error_naming_it(tmp_path):
    path = tmp_path / "missing.safetensors"
    with (
        pytest.raises(ValueError, match=re.escape(f"{path} is not a readable safetensors file: ")),
        open_safetensors(path),
    ):
        pass
