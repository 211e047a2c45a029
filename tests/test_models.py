"""build_model for each architecture, replace_head, Normalize and count_params."""
import pytest
import torch
from torch import nn

from ensemble_kd.config import ModelConfig
from ensemble_kd.models import Classifier, Normalize, build_model, count_params, replace_head


@pytest.mark.parametrize("cfg, input_shape, mean, std", [
    (ModelConfig(arch="mlp", hidden=[8, 4]), (6,), [0.0], [1.0]),
    (ModelConfig(arch="mlp", hidden=[8]), (1, 5, 5), [0.5], [0.25]),
    (ModelConfig(arch="mlp", hidden=[]), (3,), [0.0], [1.0]),
    (ModelConfig(arch="cnn", channels=[4, 8]), (1, 8, 8), [0.5], [0.25]),
    (ModelConfig(arch="cnn", channels=[4]), (3, 7, 7), [0.4, 0.5, 0.6], [0.2, 0.2, 0.2]),
    (ModelConfig(arch="resnet", depth=8, width=4), (3, 8, 8), [0.4, 0.5, 0.6], [0.2, 0.2, 0.2]),
], ids=["mlp-flat", "mlp-image", "mlp-linear", "cnn-gray", "cnn-rgb-odd", "resnet8"])
def test_each_architecture_gives_logits_of_shape_n_by_c(cfg, input_shape, mean, std):
    torch.manual_seed(0)
    model = build_model(cfg, input_shape, num_classes=5, mean=mean, std=std)
    assert isinstance(model, Classifier)
    model.eval()
    logits = model(torch.rand(3, *input_shape))
    assert logits.shape == (3, 5)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_image_architectures_reject_flat_inputs(arch):
    with pytest.raises(ValueError, match=rf"{arch} needs image inputs .*use model.arch = 'mlp'"):
        build_model(ModelConfig(arch=arch, depth=8), (64,), 10, [0.0], [1.0])


def test_unknown_architecture_is_rejected():
    with pytest.raises(ValueError, match="unknown architecture 'vit'; choose from mlp, cnn, resnet"):
        build_model(ModelConfig(arch="vit"), (4,), 2, [0.0], [1.0])


@pytest.mark.parametrize("depth", [10, 2, 21])
def test_resnet_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match=rf"resnet depth must be 6n\+2 .*got {depth}"):
        build_model(ModelConfig(arch="resnet", depth=depth), (3, 8, 8), 10, [0.0] * 3, [1.0] * 3)


def test_resnet_depth_sets_the_number_of_blocks():
    # depth 14 -> (14 - 2) / 6 = 2 basic blocks per stage, 3 stages.
    model = build_model(ModelConfig(arch="resnet", depth=14, width=4), (3, 8, 8), 10, [0.0] * 3, [1.0] * 3)
    blocks = [m for m in model.features.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 6
    assert model.head.in_features == 16  # width 4 doubled twice


def test_replace_head_keeps_the_features_and_sets_the_given_rows():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="mlp", hidden=[3], dropout=0.0), (4,), 5, [0.0], [1.0])
    features_before = {k: v.clone() for k, v in model.features.state_dict().items()}
    weight = torch.arange(6, dtype=torch.float32).view(2, 3)  # 2 outputs on 3 features
    bias = torch.tensor([0.5, -0.5])
    same = replace_head(model, weight, bias)
    assert same is model
    assert model.head.out_features == 2 and model.head.in_features == 3
    assert torch.equal(model.head.weight, weight) and torch.equal(model.head.bias, bias)
    for key, value in model.features.state_dict().items():
        assert torch.equal(value, features_before[key])
    model.eval()
    x = torch.rand(4, 4)
    expected = model.features(model.normalize(x)) @ weight.T + bias
    assert torch.allclose(model(x), expected)
    # the new head trains: its parameters are leaves that require gradients
    assert model.head.weight.requires_grad


def test_normalize_subtracts_the_mean_and_divides_by_the_std_per_channel():
    norm = Normalize([1.0, 2.0], [2.0, 4.0], ndim=3)
    x = torch.tensor([[[[3.0]], [[10.0]]]])  # (N=1, C=2, H=1, W=1)
    assert torch.equal(norm(x), torch.tensor([[[[1.0]], [[2.0]]]]))  # (3-1)/2, (10-2)/4
    flat = Normalize([1.0, 0.0], [0.5, 2.0], ndim=1)
    assert torch.equal(flat(torch.tensor([[2.0, 4.0]])), torch.tensor([[2.0, 2.0]]))  # (2-1)/0.5, 4/2
    assert "mean" in dict(flat.named_buffers()) and "std" in dict(flat.named_buffers())


def test_count_params_by_hand():
    # input 4 -> hidden 3 -> 2 classes: 4*3 + 3 + 3*2 + 2 = 23 (Normalize's buffers are not parameters).
    model = build_model(ModelConfig(arch="mlp", hidden=[3]), (4,), 2, [0.0], [1.0])
    assert count_params(model) == 23
    assert count_params(nn.Linear(5, 7)) == 42
