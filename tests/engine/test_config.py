"""LoraConfig (lorakit.engine.config): its checks, how target lists, regexes and "all-linear" pick layers, the
per-layer rank and α patterns, and --targets as typed on a command line."""

import re

import pytest
from helpers import ALL
from torch import nn

import lorakit as lk
from lorakit.engine import model as engine_model
from lorakit.engine.config import is_svd_init, matches_target, pattern_value, targets_from_text, within_target


def test_config_errors_are_clear(net):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lk.LoraConfig(r=0, target_modules=ALL)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        lk.LoraConfig(r=2, alpha=float("inf"), target_modules=ALL)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        lk.LoraConfig(r=2, alpha=float("nan"), target_modules=ALL)
    with pytest.raises(ValueError, match="matches no module; the model has: embed, conv, hidden, out"):
        lk.inject(net, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot put LoRA on a ReLU"):
        lk.inject(nn.Sequential(nn.ReLU()), lk.LoraConfig(r=2, target_modules=["0"]))


def test_target_selection_by_suffix_regex_all_linear_and_exclusion(net):
    def targets(**kwargs):
        return engine_model.find_targets(net, lk.LoraConfig(r=1, **kwargs))

    assert targets(target_modules=["hidden", "out"]) == ["hidden", "out"]
    assert targets(target_modules=r"(hidden|conv)") == ["conv", "hidden"]
    with pytest.raises(ValueError, match="matches no module"):  # a regex must match the whole path
        targets(target_modules="hid")
    assert targets(target_modules="all-linear") == ["hidden", "out"]
    assert targets(target_modules="all-linear", exclude_modules=["out"]) == ["hidden"]


def test_rank_and_alpha_patterns_override_per_layer(net):
    config = lk.LoraConfig(r=2, alpha=4, target_modules=ALL, rank_pattern={"hidden": 6}, alpha_pattern={"o.t": 1})
    lk.inject(net, config)
    assert net.hidden.rank("default") == 6 and net.hidden.scale["default"] == pytest.approx(4 / 6)
    assert net.out.rank("default") == 2 and net.out.scale["default"] == pytest.approx(1 / 2)
    assert net.conv.rank("default") == 2 and net.conv.scale["default"] == pytest.approx(2)


def test_command_line_targets_are_names_unless_written_as_a_regex(net):
    from lorakit.engine.config import targets_from_text

    assert targets_from_text("hidden") == ["hidden"]
    assert engine_model.find_targets(net, lk.LoraConfig(target_modules=targets_from_text("hidden"))) == ["hidden"]
    assert targets_from_text("q_proj, v_proj,,down_proj") == ["q_proj", "v_proj", "down_proj"]
    assert targets_from_text("self_attn.q_proj") == ["self_attn.q_proj"]  # a path suffix, not a regex
    assert targets_from_text("all-linear") == "all-linear"
    assert targets_from_text(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    assert targets_from_text(r"layers\.\d{1,2}\.mlp\..*") == r"layers\.\d{1,2}\.mlp\..*"  # its comma stays
    assert targets_from_text(None) is None


def test_a_name_matches_the_whole_path_or_its_end_after_a_dot_never_a_substring():
    assert matches_target(["q_proj"], "q_proj")
    assert matches_target(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert not matches_target(["q_proj"], "model.layers.0.self_attn.xq_proj")
    assert not matches_target(["q_proj"], "model.q_proj_extra")
    assert matches_target(["self_attn.q_proj"], "layers.0.self_attn.q_proj")
    assert not matches_target(["self_attn.q_proj"], "layers.0.cross_attn.q_proj")
    assert not matches_target(None, "q_proj")


def test_a_regex_must_match_the_whole_path():
    assert matches_target(r".*\.q_proj", "layers.0.q_proj")
    assert not matches_target(r".*\.q_proj", "q_proj")  # no dot before it
    assert not matches_target("q", "q_proj")
    assert matches_target(r"layers\.[01]\..*", "layers.1.mlp")
    assert not matches_target(r"layers\.[01]\..*", "layers.2.mlp")


def test_within_target_also_picks_the_modules_inside_a_target():
    assert within_target(["classifier"], "classifier")
    assert within_target(["classifier"], "classifier.dense")
    assert within_target(["classifier"], "model.classifier.out_proj")
    assert not within_target(["classifier"], "classifier_head.dense")
    assert not within_target(None, "classifier")


def test_pattern_keys_match_the_end_of_a_path_at_a_dot_and_the_first_in_sorted_order_wins():
    config = lk.LoraConfig(r=2, target_modules=["x"], rank_pattern={"v_proj": 4, r"layers\.1\..*": 6})
    assert list(config.rank_pattern) == [r"layers\.1\..*", "v_proj"]  # sorted, as PEFT writes and reads them
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 6  # both match: the first sorted key wins
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert config.rank_for("model.layers.0.self_attn.xv_proj") == 2  # "v_proj" starts only at a dot
    assert pattern_value({}, "anything", "default") == "default"


def test_the_scale_is_alpha_over_r_or_over_its_root_with_rslora():
    plain = lk.LoraConfig(r=4, alpha=8, target_modules=["x"], alpha_pattern={"y": 2})
    assert plain.scale_for("x") == 2.0 and plain.scale_for("y") == 0.5
    assert plain.scale_for("x", r=16) == 0.5  # a stored rank overrides the configured one
    rslora = lk.LoraConfig(r=4, alpha=8, target_modules=["x"], use_rslora=True)
    assert rslora.scale_for("x") == 4.0 and rslora.scale_for("x", r=16) == 2.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"target_modules": None}, "LoraConfig needs target_modules"),
        ({"r": True}, "r must be a positive integer, got True"),
        ({"alpha": "8"}, "alpha must be a finite number, got '8'"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"init": "xavier"}, "init must be one of"),
        ({"init": "pissa_niter_"}, "init must be one of"),
        ({"init_std": 0.0}, "init_std must be a positive number, got 0.0"),
        ({"bias": "some"}, "bias must be one of ('none', 'all', 'lora_only'), got 'some'"),
        ({"rank_pattern": [("q", 2)]}, "rank_pattern must map module patterns to values, got [('q', 2)]"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern['q'] must be a positive integer, got 0"),
        ({"alpha_pattern": {"q": float("nan")}}, "alpha_pattern['q'] must be a finite number, got nan"),
        ({"alpha_pattern": {"[": 2.0}}, "invalid regular expression '['"),
        ({"target_modules": "(q_proj"}, "invalid regular expression '(q_proj'"),
    ],
)
def test_a_bad_setting_is_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lk.LoraConfig(**{"r": 2, "target_modules": ["q"], **changes})


def test_a_config_normalises_what_it_is_given():
    config = lk.LoraConfig(target_modules=("v", "q"), modules_to_save={"head"}, init=True)
    assert config.target_modules == ["q", "v"] and config.modules_to_save == ["head"]
    assert config.init == "kaiming"  # PEFT's init_lora_weights=True
    seq_cls = lk.LoraConfig(target_modules=["q"], modules_to_save=["pooler", "score"], task_type="SEQ_CLS")
    assert seq_cls.modules_to_save == ["pooler", "score", "classifier"]  # PEFT trains the heads in full


def test_inits_from_the_weight_are_named_pissa_pissa_niter_k_milora_and_olora():
    assert all(is_svd_init(init) for init in ("pissa", "pissa_niter_4", "pissa_niter_16", "milora", "olora"))
    assert not any(is_svd_init(init) for init in ("pissa_niter_", "pissa_niter_x", "gaussian", "kaiming", False, None))


def test_command_line_targets_with_a_broken_regex_are_refused():
    with pytest.raises(ValueError, match=re.escape("invalid regular expression '(q|v_proj'")):
        targets_from_text("(q|v_proj")
