"""`import lorakit as lk` (lorakit/__init__.py): every public name is there, imported from its module on first use,
so that importing the package (and starting the `lorakit` command) loads no torch, transformers or matplotlib."""

import subprocess
import sys

import pytest

import lorakit as lk


def test_importing_lorakit_loads_neither_torch_nor_transformers_nor_matplotlib():
    heavy = ("torch", "transformers", "matplotlib")
    script = f"import sys, lorakit\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_public_name_resolves_to_its_modules_own_object_and_is_listed_by_dir():
    from lorakit.engine.model import inject
    from lorakit.tools.inspect import inspect

    namespace = {}
    exec("from lorakit import *", namespace)  # a star import takes __all__'s names through __getattr__
    assert set(lk.__all__) <= set(namespace) and set(lk.__all__) <= set(dir(lk))
    assert lk.inject is inject and lk.inspect is inspect and lk.lowrank is sys.modules["lorakit.lowrank"]
    assert isinstance(lk.LoraConfig(target_modules=["q"]), lk.LoraConfig)


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="module 'lorakit' has no attribute 'injcet'"):
        lk.injcet  # noqa: B018
