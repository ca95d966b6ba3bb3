"""The fuzz suite of issue 18: generated bad adapter directories, configs, checkpoints, logs, data files and command
lines. For each, lorakit either succeeds or refuses with one ValueError / OSError (`lorakit: error:` and exit 2 on
the command line, one line, no traceback); on a refusal the model and every file are as they were; and each case
ends within WALL_SECONDS (a hang is a failure, not a slow pass).

`pytest tests/fuzz --hypothesis-show-statistics` prints how many inputs each test tried and how they ended (the
`event`s: "refused", "loaded", ...). The generated tests (hypothesis, a few hundred cases each) are marked slow;
`make test-fast` runs the fixed cases (config and weight files that are no such file) alone.
"""

import contextlib
import io
import json
import math
import re
import shutil
import signal
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import adapted_net, build_net, finetune_args, small_adapter, tree
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.cli import main
from lorakit.training.checkpoint import STATE_NAME, TENSORS_NAME, load_checkpoint, save_checkpoint
from lorakit.training.metrics import keep_metrics_until

WALL_SECONDS = 20  # per case: everything here answers in well under a second unless it hangs
FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


class Hang(BaseException):
    """A case that ran past WALL_SECONDS."""


@contextmanager
def within(seconds: float = WALL_SECONDS) -> Iterator[None]:
    """Fails the case that runs past `seconds` (SIGALRM interrupts the Python code of a hang)."""

    def hang(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


ERROR_LINE = re.compile(r"lorakit( [a-z]+)?: error: ")


class ModelReached(ValueError):
    """every check passed before the model loads"""


def reached(*args, **kwargs):
    """Stands in for loading the model (or the demo's data): what follows is tested elsewhere."""
    raise ModelReached(ModelReached.__doc__)


def record(outcome: str) -> None:
    """Counts how a case ended, for --hypothesis-show-statistics (outside a generated case: not counted)."""
    with contextlib.suppress(InvalidArgument):
        event(outcome)


# -- values ----------------------------------------------------------------------------------------------------------

NASTY_TEXT = [
    "",
    " ",
    "(",
    "[",
    "(?i)HIDDEN",
    r"(?:.|..)+\d",
    "a{1,99999999999}",
    "(?P<",
    ".*",
    "hidden|conv",
    "all-linear",
    "hidden",
    "embed",
    "false",
    "true",
    "0.1",
    "1e400",
    "LORA",
    "LOHA",
    "gaussian",
    "pissa",
    "olora",
    "SEQ_CLS",
    "all",
    "lora_only",
    "two\nlines",
    "\x00",
    "é",
    "../../etc",
    "/proc/self",
]
NUMBERS = [
    0,
    -1,
    1,
    2,
    3,
    7,
    2**31,
    2**63,
    2**64,
    10**99,
    -(10**99),
    0.0,
    -0.0,
    0.5,
    1.7e308,
    -1e-300,
    math.inf,
    -math.inf,
    math.nan,
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(NUMBERS),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NASTY_TEXT),
    st.text(max_size=12),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(NASTY_TEXT), inner, max_size=3),
    max_leaves=8,
)
DEEP = "[" * 100_000  # RecursionError in Python's own parser


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


# -- adapter directories ---------------------------------------------------------------------------------------------

FIELDS = [
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "bias",
    "fan_in_fan_out",
    "init_lora_weights",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "inference_mode",
    "use_dora",
    "lora_bias",
    "layers_to_transform",
    "target_parameters",
    "trainable_token_indices",
]


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    """Net's adapter (r 2 on embed, conv and hidden), as lorakit saves it."""
    return lk.save_adapter(adapted_net(), tmp_path_factory.mktemp("good") / "adapter")


def snapshot(model: torch.nn.Module) -> tuple:
    return (
        [name for name, _ in model.named_modules()],
        {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()},
    )


def same(a: tuple, b: tuple) -> bool:
    return (
        a[0] == b[0]
        and a[1].keys() == b[1].keys()
        and all(torch.equal(a[1][k][0], b[1][k][0]) and a[1][k][1] == b[1][k][1] for k in a[1])
    )


def load_or_refuse(path: Path) -> None:
    """lk.load_adapter on a fresh Net: loads, or refuses with a ValueError / OSError leaving it as it was; and
    `lorakit inspect` in this process: exit 0, or 2 with one line."""
    model = build_net()
    before, files = snapshot(model), tree(path)
    with within():
        try:
            lk.load_adapter(model, path)
            record("loaded")
        except (ValueError, OSError):
            record("refused")
            assert same(snapshot(model), before)
            assert lk.adapter_names(model) == []
    assert tree(path) == files
    check_command(["inspect", str(path)], inputs=[path])


def check_command(argv: list[str], inputs: list[Path]) -> int:
    """Runs `lorakit argv` in this process: exit 0, or 2 with one `lorakit: error:` line (after argparse's usage for a
    usage error), never a traceback or another code; every input file as it was."""
    files = {path: tree(path) if path.is_dir() else path.read_bytes() for path in inputs if path.exists()}
    stderr, stdout = io.StringIO(), io.StringIO()
    with within(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code
    err = stderr.getvalue()
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, err
    if code == 2:  # lorakit's own line, or argparse's ("lorakit extract: error: ...", after the usage)
        errors = [line for line in err.splitlines() if ERROR_LINE.match(line)]
        assert len(errors) == 1 and err.splitlines()[-1] == errors[0], (argv, err)
        record(f"{argv[0]}: {'checks passed' if ModelReached.__doc__ in err else 'refused'}")
    else:
        record(f"{argv[0]}: succeeded")
    assert {path: tree(path) if path.is_dir() else path.read_bytes() for path in files} == files, argv
    return code


@pytest.mark.slow
@FUZZ
@given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON, min_size=1, max_size=4))
def test_fuzzed_configs_load_or_are_refused_cleanly(good_adapter, tmp_path_factory, changes):
    path = Path(shutil.copytree(good_adapter, tmp_path_factory.mktemp("fuzz") / "adapter"))
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))  # NaN, Infinity: as Python writes
    load_or_refuse(path)


@pytest.mark.parametrize(
    "text",
    [
        DEEP,
        json.dumps(nested(65)),
        "{",
        "",
        "[]",
        "null",
        '"LORA"',
        '{"r": ' + "9" * 5000 + "}",
        "\xff\xfe",
        json.dumps({"pad": "x" * (17 * 2**20)}),
        '{"r": 2, "r": "two"}',
        '{"target_modules": ' + json.dumps(nested(60)) + "}",
    ],
    ids=[
        "deep-100000",
        "deep-65",
        "truncated",
        "empty",
        "list",
        "null",
        "text",
        "5000-digits",
        "not-utf8",
        "17MB",
        "duplicate-key",
        "targets-60-deep",
    ],
)
def test_config_files_that_are_no_config_are_refused_cleanly(good_adapter, tmp_path, text):
    path = Path(shutil.copytree(good_adapter, tmp_path / "adapter"))
    (path / "adapter_config.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    load_or_refuse(path)


DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
MUTATION = st.one_of(
    st.just(("delete", None)),
    st.tuples(st.just("dtype"), st.sampled_from(DTYPES)),
    st.tuples(st.just("shape"), st.lists(st.integers(0, 40), min_size=0, max_size=4)),
    st.tuples(st.just("fill"), st.sampled_from([math.nan, math.inf, -math.inf, 1e38, 0.0])),
)


@pytest.mark.slow
@FUZZ
@given(mutations=st.dictionaries(st.integers(0, 20), MUTATION, min_size=1, max_size=3), extra=st.booleans())
def test_fuzzed_tensor_files_load_or_are_refused_cleanly(good_adapter, tmp_path_factory, mutations, extra):
    path = Path(shutil.copytree(good_adapter, tmp_path_factory.mktemp("fuzz") / "adapter"))
    tensors = load_file(path / "adapter_model.safetensors")
    keys = sorted(tensors)
    for index, (kind, value) in mutations.items():
        key = keys[index % len(keys)]
        if kind == "delete":
            tensors.pop(key, None)
        elif key in tensors and kind == "dtype":
            tensors[key] = tensors[key].to(value)
        elif key in tensors and kind == "shape":
            tensors[key] = torch.ones(value)
        elif key in tensors:  # through float32: a float8 tensor takes inf as NaN instead of raising
            tensors[key] = torch.full(tensors[key].shape, value).to(tensors[key].dtype)
    if extra:
        tensors["base_model.model.head.lora_B.weight"] = torch.ones(3, 2)  # a B without its A
    save_file(tensors, path / "adapter_model.safetensors")
    load_or_refuse(path)
    check_command(["resize", str(path), "--rank", "1", "--out", str(path.parent / "resized")], inputs=[path])


def test_weights_that_are_no_safetensors_file_are_refused_cleanly(good_adapter, tmp_path):
    for data in (b"", b"\x00" * 7, b"\xff" * 8 + b"{}", (good_adapter / "adapter_model.safetensors").read_bytes()[:60]):
        path = Path(shutil.copytree(good_adapter, tmp_path / f"adapter-{len(data)}"))
        (path / "adapter_model.safetensors").write_bytes(data)
        load_or_refuse(path)


# -- checkpoints and logs ------------------------------------------------------------------------------------------


def run_state():
    torch.manual_seed(0)
    model = lk.inject(torch.nn.Sequential(torch.nn.Linear(6, 4)), lk.LoraConfig(r=2, target_modules=["0"], init=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler


PATHS = st.lists(
    st.sampled_from(
        [
            "step",
            "param_groups",
            "optimizer_scalars",
            "scheduler",
            "run",
            "0",
            "lr",
            "betas",
            "last_epoch",
            "_step_count",
            "lr_lambdas",
            "base_lrs",
            "eps",
            "0.0",
        ]
    ),
    max_size=3,
)


@pytest.mark.slow
@FUZZ
@given(
    where=PATHS,
    value=JSON,
    tensor=st.sampled_from([None, "rng.torch", "optimizer.0.exp_avg", "optimizer.0.step"]),
    fill=st.sampled_from([0, 255, math.nan]),
)
def test_fuzzed_checkpoints_load_or_are_refused_leaving_the_run_as_it_was(tmp_path_factory, where, value, tensor, fill):
    saved = save_checkpoint(tmp_path_factory.mktemp("ckpt"), 1, *run_state(), {"run": {}}, keep=1)
    state = json.loads((saved / STATE_NAME).read_text())
    node = state
    for key in where[:-1]:
        child = node.get(key) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            break
        node = child
    node[where[-1] if where else "step"] = value
    (saved / STATE_NAME).write_text(json.dumps(state))
    if tensor is not None:
        tensors = load_file(saved / TENSORS_NAME)
        if tensor in tensors:  # NaN into a float, 0 or 255 into every byte of a generator state
            tensors[tensor] = (
                torch.full(tensors[tensor].shape, fill, dtype=torch.float64).nan_to_num(7).to(tensors[tensor].dtype)
                if not tensors[tensor].is_floating_point()
                else torch.full_like(tensors[tensor], fill)
            )
        save_file(tensors, saved / TENSORS_NAME)
    model, optimizer, scheduler = run_state()
    before = (json.dumps(optimizer.state_dict(), default=str), scheduler.state_dict(), lk.lora_state_dict(model))
    before = (before[0], before[1], {k: v.clone() for k, v in before[2].items()})
    rng = torch.get_rng_state()
    with within():
        try:
            load_checkpoint(saved, model, optimizer, scheduler)
            record("loaded")
        except ValueError:
            record("refused")
            assert json.dumps(optimizer.state_dict(), default=str) == before[0]
            assert scheduler.state_dict() == before[1]
            assert all(torch.equal(v, before[2][k]) for k, v in lk.lora_state_dict(model).items())
            assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow
@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            JSON.map(json.dumps),
            st.sampled_from(['{"step": 1, "lo', DEEP[:500], "\x00", '{"step": "9"}', '{"step": 2, "loss": 0.5}']),
        ),
        max_size=6,
    )
)
def test_a_fuzzed_log_never_blocks_a_resume(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("log") / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with within(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n damaged line(s) dropped": expected here
        keep_metrics_until(path, 2)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(isinstance(r, dict) and isinstance(r.get("step", 0), int) and r.get("step", 0) <= 2 for r in kept)


# -- data files ------------------------------------------------------------------------------------------------------

ROWS = st.one_of(
    st.fixed_dictionaries({"text": st.sampled_from(["the cat sat", "a dog ran", "", " "])}),
    st.fixed_dictionaries({"text": SCALARS}),
    st.fixed_dictionaries({"prompt": JSON, "completion": JSON}),
    st.fixed_dictionaries({"messages": JSON}),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "assistant", "system", "x", ""]), "content": SCALARS}
                ),
                max_size=3,
            )
        }
    ),
    st.fixed_dictionaries({"instruction": SCALARS, "input": SCALARS, "output": SCALARS}),
    st.fixed_dictionaries({"conversations": JSON}),
    JSON,
)
LINES = st.lists(
    st.one_of(ROWS.map(json.dumps), st.sampled_from([DEEP[:2000], "{", "", "\ufeff{}", "\u2028"])),
    min_size=0,
    max_size=8,
)


@pytest.mark.slow
@FUZZ
@given(
    lines=LINES,
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]),
    extra=st.sampled_from([(), ("--format", "messages"), ("--task", "seq-cls"), ("--packing",)]),
)
def test_fuzzed_data_files_are_read_or_refused_before_the_model_loads(
    tiny_llama, tmp_path_factory, monkeypatch, lines, suffix, extra
):
    monkeypatch.setattr("lorakit.training.loop.load_model_and_tokenizer", reached)
    directory = tmp_path_factory.mktemp("data")
    data = directory / f"train{suffix}"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    out = directory / "run"
    check_command(finetune_args(tiny_llama, data, out, *extra), inputs=[data, tiny_llama])
    assert not out.exists() or not any(p for p in out.rglob("*") if p.name != "train_config.json")


# -- command lines ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs_root(tmp_path_factory, tiny_llama) -> Path:
    """The files the generated command lines read: two adapters, two weight files, data and a model directory."""
    root = tmp_path_factory.mktemp("inputs")
    small_adapter()[0].save(root / "a")
    small_adapter()[0].save(root / "b")
    save_file({"w.weight": torch.randn(8, 6)}, root / "m.safetensors")
    save_file({"w.weight": torch.randn(8, 6)}, root / "t.safetensors")
    (root / "train.jsonl").write_text('{"text": "the cat sat"}\n' * 8)
    shutil.copytree(tiny_llama, root / "model")
    return root


INPUTS = {"a": "a", "b": "b", "m": "m.safetensors", "t": "t.safetensors", "data": "train.jsonl", "model": "model"}


def path_values(places: dict[str, Path]) -> st.SearchStrategy[str]:
    inputs = [str(places[name]) for name in ("a", "b", "m", "t", "data", "model")]
    return st.one_of(
        st.sampled_from(inputs),
        st.sampled_from(
            [
                "",
                " ",
                "nope",
                "two\nlines",
                "/proc/lorakit",
                str(places["a"] / "inside"),
                str(places["root"]),
                str(places["a"] / "adapter_model.safetensors"),
                "-x",
            ]
        ),
        st.text(alphabet="abc./\n ", max_size=6).map(lambda t: str(places["root"] / "out" / t)),
    )


NUMBER_TEXT = st.sampled_from(
    ["0", "-1", "1", "2", "1.5", "1e308", "inf", "nan", "-inf", "two", "", str(10**30), str(2**63), "1e-400"]
)


def command_lines(places: dict[str, Path]) -> st.SearchStrategy[list[str]]:
    path = path_values(places)
    out = path_values(places)
    flags = {
        "inspect": st.lists(st.sampled_from([["--json"], ["--plot"]]), max_size=2),
        "compare": st.lists(st.sampled_from([["--json"], ["--plot"]]), max_size=2),
        "resize": st.lists(st.sampled_from([["--rank"], ["--energy"], ["--out"]]), max_size=3),
        "combine": st.lists(st.sampled_from([["--weights"], ["--method"], ["--rank"], ["--out"]]), max_size=3),
        "extract": st.lists(st.sampled_from([["--rank"], ["--energy"], ["--targets"], ["--out"]]), max_size=3),
        "rank": st.lists(st.sampled_from([["--energy"], ["--top"], ["--key"], ["--plot"], ["--json"]]), max_size=3),
        "finetune": st.lists(
            st.sampled_from(
                [
                    ["--seed"],
                    ["--rank"],
                    ["--alpha"],
                    ["--lr"],
                    ["--steps"],
                    ["--batch-size"],
                    ["--max-length"],
                    ["--targets"],
                    ["--dropout"],
                ]
            ),
            max_size=3,
        ),
        "demo": st.lists(st.sampled_from([["--rank"], ["--seed"], ["--alpha"], ["--steps"], ["--out"]]), max_size=3),
    }
    positional = {
        "inspect": 1,
        "compare": 2,
        "resize": 1,
        "combine": 2,
        "extract": 2,
        "rank": 1,
        "finetune": 0,
        "demo": 0,
    }

    @st.composite
    def line(draw):
        command = draw(st.sampled_from(sorted(flags)))
        argv = [command, *(draw(path) for _ in range(positional[command]))]
        for (flag,) in draw(flags[command]):
            value = draw(
                out
                if flag in ("--out", "--plot")
                else st.sampled_from(["svd", "cat", "linear", "x", ""])
                if flag == "--method"
                else st.sampled_from(["w.weight", "", "q_proj", "(", r"(?:.|..)+\d"])
                if flag in ("--key", "--targets")
                else NUMBER_TEXT
            )
            argv += [flag] if flag == "--json" else [flag, value]
        if command == "finetune":
            argv += ["--model", draw(path), "--data", draw(path), "--out", draw(out), "--no-progress"]
        if command in ("resize", "combine", "extract") and "--out" not in argv:
            argv += ["--out", draw(out)]
        return argv

    return line()


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_command_lines_succeed_or_exit_2_with_one_line(inputs_root, monkeypatch, data):
    monkeypatch.setattr("lorakit.training.loop.load_model_and_tokenizer", reached)  # finetune: the checks alone
    monkeypatch.setattr("lorakit.demo.experiment.load_digits_split", reached)  # demo: likewise
    with tempfile.TemporaryDirectory() as directory:  # each case on its own copy: an output may go anywhere in it
        root = Path(shutil.copytree(inputs_root, Path(directory) / "root"))
        monkeypatch.chdir(root)  # relative outputs ("nope") land here too
        places = {name: root / relative for name, relative in INPUTS.items()} | {"root": root}
        argv = data.draw(command_lines(places))
        check_command(argv, inputs=[places[name] for name in INPUTS if str(places[name]) in read_by(argv)])


def read_by(argv: list[str]) -> list[str]:
    """The arguments of a command line that name what it reads: all but the values of --out and --plot."""
    return [arg for k, arg in enumerate(argv) if k == 0 or argv[k - 1] not in ("--out", "--plot")]
