"""`demo_run`: one `lorakit demo --quick` for all the demo's tests in a session (the experiment's invariants and
its report in a browser), as (output directory, metrics.json)."""

import json

import pytest

from lorakit.cli import main


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--seed", "0"]) == 0
    return out, json.loads((out / "metrics.json").read_text())
