"""Typed YAML configs: inheritance, overrides, type checks, errors that name the key."""

from pathlib import Path

import pytest

from retinanet.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
    parse_override,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_paper_settings():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.loss.alpha, cfg.loss.gamma) == (0.25, 2.0)
    assert cfg.model.head.prior_probability == 0.01 and cfg.model.head.num_convs == 4
    assert cfg.model.anchors.sizes == [32.0, 64.0, 128.0, 256.0, 512.0]
    assert cfg.model.anchors.scales == pytest.approx([1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    assert cfg.model.anchors.aspect_ratios == [0.5, 1.0, 2.0]
    assert (cfg.model.matcher.fg_iou_threshold, cfg.model.matcher.bg_iou_threshold) == (0.5, 0.4)
    inference = cfg.model.inference
    assert (inference.score_threshold, inference.topk_candidates) == (0.05, 1000)
    assert inference.nms_threshold == 0.5


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path):
    assert isinstance(load_config(path), Config)


def test_recipes_inherit_and_override():
    r101 = load_config(CONFIGS / "retinanet_R101_FPN_600.yaml")
    assert r101.model.backbone.depth == 101  # its own key
    assert r101.input.min_size == [600] and r101.input.max_size == 1000  # from R50_600
    assert r101.train.lr_steps == [60000, 80000]  # from R50_1x, two levels up


def test_unknown_key_names_the_dotted_key_and_suggests_the_close_one(tmp_path):
    path = _write(tmp_path / "typo.yaml", "model:\n  backbone:\n    dpeth: 101\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'model.backbone.dpeth'" in message
    assert "did you mean 'model.backbone.depth'" in message
    assert str(path) in message


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    with pytest.raises(ConfigError, match=r"'loss\.zzz'.*known keys: alpha, alpha_start, box_loss"):
        load_config(None, ["loss.zzz=1"])


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"'train\.base_lrr'.*did you mean 'train\.base_lr'"):
        load_config(None, ["train.base_lrr=0.02"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.max_iter=ten", "train.max_iter"),
        ("train.max_iter=1.5", "train.max_iter"),
        ("model.backbone.stride_in_1x1=1", "model.backbone.stride_in_1x1"),
        ("train.base_lr=true", "train.base_lr"),
        ("train.lr_steps=[1000, x]", r"train.lr_steps\[1\]"),
        ("model.fpn.p6_source=5", "model.fpn.p6_source"),
        ("loss.alpha=high", "loss.alpha"),
    ],
)
def test_type_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_type_error_in_a_file_names_the_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "train:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=rf"'train\.batch_size' \({path}\) must be int"):
        load_config(path)


def test_errors_name_the_file_or_override_that_set_the_key(tmp_path):
    # A section merged from several sources: each key keeps its own origin.
    base = _write(tmp_path / "base.yaml", "train:\n  batch_size: many\n")
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\ntrain:\n  base_lr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"'train\.batch_size' \({base}\)"):
        load_config(child)
    with pytest.raises(ConfigError, match=rf"'train\.batch_size' \({base}\)"):
        load_config(base, ["train.base_lr=0.1"])
    with pytest.raises(ConfigError, match=r"'train\.base_lr' \(command-line override"):
        load_config(child, ["train.batch_size=2", "train.base_lr=x"])
    good = _write(tmp_path / "good.yaml", "train:\n  base_lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'foo' in command-line override 'foo\.bar=1'"):
        load_config(good, ["foo.bar=1"])


def test_numbers_are_coerced_where_lossless():
    cfg = load_config(None, ["train.base_lr=1", "train.max_iter=100.0", "loss.alpha=null"])
    assert cfg.train.base_lr == 1.0 and isinstance(cfg.train.base_lr, float)
    assert cfg.train.max_iter == 100 and isinstance(cfg.train.max_iter, int)
    assert cfg.loss.alpha is None


def test_scalar_becomes_a_one_element_list(tmp_path):
    path = _write(tmp_path / "single.yaml", "input:\n  min_size: 640\n")
    assert load_config(path).input.min_size == [640]
    assert load_config(None, ["input.min_size=512"]).input.min_size == [512]
    assert load_config(None, ["input.min_size=[512, 544]"]).input.min_size == [512, 544]


def test_base_inheritance_relative_to_the_file_and_nested_override(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(
        tmp_path / "base.yaml",
        "model:\n  backbone:\n    depth: 101\n    norm: bn\ntrain:\n  base_lr: 0.02\n",
    )
    child = _write(
        tmp_path / "sub" / "child.yaml",
        "_base_: ../base.yaml\nmodel:\n  backbone:\n    depth: 34\n",
    )
    cfg = load_config(child)
    # The child overrides one nested key and keeps its siblings from the base.
    assert cfg.model.backbone.depth == 34 and cfg.model.backbone.norm == "bn"
    assert cfg.train.base_lr == 0.02
    # Command-line overrides come last.
    cfg = load_config(child, ["model.backbone.norm=gn", "train.base_lr=0.005"])
    assert cfg.model.backbone.norm == "gn" and cfg.model.backbone.depth == 34
    assert cfg.train.base_lr == 0.005


def test_several_bases_merge_in_order(tmp_path):
    _write(tmp_path / "a.yaml", "train:\n  base_lr: 0.1\n  max_iter: 10\n")
    _write(tmp_path / "b.yaml", "train:\n  base_lr: 0.2\n")
    both = _write(tmp_path / "both.yaml", "_base_: [a.yaml, b.yaml]\n")
    cfg = load_config(both)
    assert cfg.train.base_lr == 0.2 and cfg.train.max_iter == 10


def test_inheritance_cycles_are_reported(tmp_path):
    _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")
    broken = _write(tmp_path / "broken.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(broken)
    listing = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping"):
        load_config(listing)
    bad_base = _write(tmp_path / "bad_base.yaml", "_base_: missing_base.yaml\n")
    with pytest.raises(ConfigError, match="missing_base.yaml"):
        load_config(bad_base)
    section = _write(tmp_path / "section.yaml", "model: 5\n")
    with pytest.raises(ConfigError, match="'model' must be a mapping"):
        load_config(section)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.backbone.norm=batch", "model.backbone.norm"),
        ("loss.box_loss=l2", "loss.box_loss"),
        ("train.optimizer=adam", "train.optimizer"),
        ("model.backbone.depth=20", "model.backbone.depth"),
        ("loss.alpha=1.5", "loss.alpha"),
        ("loss.alpha_start=0.75", "loss.alpha_start"),
        ("loss.gamma_start=-1", "loss.gamma_start"),
        ("loss.gamma_ramp_fraction=0", "loss.gamma_ramp_fraction"),
        ("model.inference.score_threshold=1", "model.inference.score_threshold"),
        ("model.anchors.sizes=[32, 64]", "model.anchors.sizes"),
        ("input.pixel_std=[1.0, 0.0, 1.0]", "input.pixel_std"),
    ],
)
def test_choices_and_ranges_are_validated(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'( \\(.*\\))? must be"):
        load_config(None, [override])


def test_a_gamma_schedule_needs_the_power_modulation():
    with pytest.raises(ConfigError, match="'loss.gamma_schedule' must be null unless"):
        load_config(None, ["loss.modulation=exponential", "loss.gamma_schedule=linear"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.base_lr"])
    assert parse_override("train.lr_steps=[10, 20]") == (["train", "lr_steps"], [10, 20])


def test_round_trip_through_a_dict_and_yaml():
    cfg = load_config(CONFIGS / "retinanet_R50_FPN_1x.yaml", ["loss.alpha=null"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert "base_lr: 0.01" in config_to_yaml(cfg)
    with pytest.raises(ConfigError, match="'train.bogus'"):
        config_from_dict({"train": {"bogus": 1}})


def test_exponent_notation_without_a_dot_is_a_float(tmp_path):
    # PyYAML parses 1e-4 as a string (YAML 1.1 wants 1.0e-4); it must still be accepted.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  weight_decay: 1e-4\n")
    cfg = load_config(path, ["train.base_lr=2e-3"])
    assert cfg.train.weight_decay == 1e-4 and cfg.train.base_lr == 2e-3
    with pytest.raises(ConfigError, match="train.base_lr"):
        load_config(path, ["train.base_lr=fast"])


def test_stride_in_1x1_needs_bottleneck_blocks():
    with pytest.raises(ConfigError, match="model.backbone.stride_in_1x1"):
        load_config(None, ["model.backbone.depth=18", "model.backbone.stride_in_1x1=true"])
    assert load_config(None, ["model.backbone.stride_in_1x1=true"]).model.backbone.depth == 50


def test_moved_keys_are_read_where_they_live_now(tmp_path):
    """train.amp and train.channels_last moved to precision.*: an old config file, an old
    override and an old checkpoint's config still mean the same, with a warning for the first
    two; the new name wins over the old, and a later file or override over an earlier one."""
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  amp: bf16\n  channels_last: true\n  max_iter: 7\n")
    with pytest.warns(UserWarning, match=r"'train.amp' \(.*old.yaml\) is now 'precision.amp'"):
        cfg = load_config(old)
    assert (cfg.precision.amp, cfg.precision.channels_last, cfg.train.max_iter) == ("bf16", True, 7)
    with pytest.warns(UserWarning, match=r"override 'train.amp='\) is now"):
        cfg = load_config(old, ["train.amp="])
    assert cfg.precision.amp is None  # the override, though spelt the old way, comes last
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("_base_: old.yaml\nprecision:\n  amp: fp16\n")
    with pytest.warns(UserWarning):
        assert load_config(recipe).precision.amp == "fp16"

    stored = config_to_dict(load_config())
    stored["train"].update(amp="bf16", channels_last=True)
    del stored["precision"]
    restored = config_from_dict(stored)
    assert (restored.precision.amp, restored.precision.channels_last) == ("bf16", True)
