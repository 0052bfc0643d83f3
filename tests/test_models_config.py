"""Backbone creation, pretrained init and the typed configuration."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from dermadetect.config import DEFAULT_BACKBONES, ModelConfig, RunConfig, replace_nested
from dermadetect.models import create_backbone, target_layer


@pytest.mark.parametrize("name", DEFAULT_BACKBONES + ("efficientnet_lite0",))
def test_backbones_have_head_and_cam_layer(name):
    model = create_backbone(name, 7, ModelConfig(pretrained=False))
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    layer = target_layer(model, name)
    features = {}
    layer.register_forward_hook(lambda m, i, o: features.setdefault("x", o))
    model(torch.randn(1, 3, 64, 64))
    assert features["x"].ndim == 4  # a spatial map, which Grad-CAM needs


def test_pretrained_file_loads_imagenet_weights():
    path = REPO.parent / "shared" / "weights" / "efficientnet_lite0.in1k.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    model = create_backbone("efficientnet_lite0", 7, ModelConfig(pretrained_files={"efficientnet_lite0": str(path)}))
    weights = load_file(path)
    assert torch.equal(model.conv_stem.weight, weights["conv_stem.weight"])
    assert model.get_classifier().out_features == 7


def test_per_backbone_weights_files_and_the_rest_from_scratch():
    """The CPU recipe: EfficientNet-Lite0 from its local ImageNet file, the other backbones from random weights."""
    path = REPO.parent / "shared" / "weights" / "efficientnet_lite0.in1k.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    cfg = ModelConfig(pretrained=False, pretrained_files={"efficientnet_lite0": str(path)})
    lite0 = create_backbone("efficientnet_lite0", 7, cfg)
    assert torch.equal(lite0.conv_stem.weight, load_file(path)["conv_stem.weight"])
    resnet = create_backbone("resnet18", 7, cfg)  # no file, pretrained=False: no Hub access attempted
    assert resnet.get_classifier().out_features == 7
    assert cfg.init_description("efficientnet_lite0") == "ImageNet (file efficientnet_lite0.in1k.safetensors)"
    assert cfg.init_description("resnet18") == "random (from scratch)"
    import train
    _, parsed = train.parse_config(["--config", str(REPO / "configs" / "cpu.yaml")])
    assert parsed.model.pretrained_files == {"efficientnet_lite0": "../shared/weights/efficientnet_lite0.in1k.safetensors"}
    _, flags = train.parse_config(["--pretrained-files", f"efficientnet_lite0={path}"])
    assert flags.model.pretrained_files == {"efficientnet_lite0": str(path)}
    with pytest.raises(SystemExit):
        train.parse_config(["--pretrained-files", "no-equals-sign"])


def test_missing_download_names_both_alternatives(tmp_path):
    code = ("from dermadetect.models import create_backbone, ModelConfig\n"
            "create_backbone('resnet18', 7, ModelConfig())")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "PretrainedWeightsError" in result.stderr
    assert "--pretrained-file" in result.stderr and "--no-pretrained" in result.stderr


def test_unknown_model_and_config_keys_fail_loudly():
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("resnet_does_not_exist", 7, ModelConfig(pretrained=False))
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.from_dict({"train": {"epochz": 3}})
    with pytest.raises(ValueError, match="unknown config key"):
        RunConfig.from_dict({"backbone": ["resnet18"]})


def test_config_round_trips_through_dict():
    cfg = replace_nested(RunConfig(), train={"epochs": 2}, backbones=("resnet18",))
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.train.epochs == 2 and cfg.train.lr == RunConfig().train.lr


def test_train_help_shows_at_most_25_options_each_explained_with_its_default():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    options = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  -")]
    assert 0 < len(options) <= 25, options
    import train
    actions = [a for a in train.build_parser(RunConfig())._actions if a.option_strings]
    assert len(actions) == len(options) and all(a.help for a in actions)
    assert "(default: 0.15)" in " ".join(result.stdout.split())  # --val-fraction shows the built-in setting
    yaml_defaults = subprocess.run([sys.executable, "train.py", "--config", "configs/cpu.yaml", "--help"], cwd=REPO,
                                   capture_output=True, text=True).stdout
    assert "--image-size IMAGE_SIZE square input size (None: the backbone's own) (default: 160)" in " ".join(
        yaml_defaults.split())  # --image-size shows the config file's


def test_stages_are_subcommands():
    result = subprocess.run([sys.executable, "-m", "dermadetect", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    for stage in ("evaluate", "analyze", "export", "publish", "predict"):
        assert stage in result.stdout
