"""Model configs, model building, the variants registered with timm, input-size checks and MAC counting."""

from __future__ import annotations

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from timm.layers import DropPath
from timm.layers.attention2d import MultiQueryAttention2d
from torch import nn

from train.nets import ModelConfigError, UnknownModelError, check_img_size, count_macs, create_model
from train.nets.configs import list_model_configs, model_config_dir

PUBLISHED = ["mnv1_100", "mnv1_075", "mnv1_050", "mnv1_025", "mnv2_140", "mnv2_100", "mnv2_075", "mnv2_050", "mnv2_035",
             "mnv3_l_100", "mnv3_l_075", "mnv3_s_100", "mnv3_s_075", "mnv3_l_min", "mnv4_conv_s", "mnv4_conv_m",
             "mnv4_conv_l", "mnv4_hybrid_m", "mnv4_hybrid_l"]
SCHEMA = {"key", "name", "family", "resolution", "drop_rate", "drop_path_rate", "paper", "zoo_note"}
PAPER_SCHEMA = {"top1", "macs_m", "params_m", "resolution", "source"}
REGISTERED = ["mt_mobilenetv1_075", "mt_mobilenetv1_050", "mt_mobilenetv1_025", "mt_mobilenetv3_large_minimal_100"]
# The smallest config of each family, for the (slower) training-step test.
ONE_PER_FAMILY = ["mnv1_025", "mnv2_035", "mnv3_s_075", "mnv4_conv_s", "mnv4_hybrid_m"]


def load_config(key: str):
    return OmegaConf.load(model_config_dir() / f"{key}.yaml")


def build(key: str, num_classes: int = 10) -> nn.Module:
    cfg = load_config(key)
    return create_model(str(cfg.name), num_classes=num_classes, drop_rate=float(cfg.drop_rate),
                        drop_path_rate=float(cfg.drop_path_rate))


def test_config_keys_are_exactly_the_published_mobilenets_plus_timm():
    assert list_model_configs() == sorted([*PUBLISHED, "timm"])


@pytest.mark.parametrize("key", PUBLISHED)
def test_model_config_has_the_schema_and_names_a_timm_native_model(key):
    path = model_config_dir() / f"{key}.yaml"
    cfg = OmegaConf.load(path)
    assert path.read_text().startswith("# "), "first line names the model and the paper/table"
    assert set(cfg.keys()) == SCHEMA
    assert set(cfg.paper.keys()) == PAPER_SCHEMA
    assert cfg.key == key
    assert cfg.family == key.split("_")[0]
    assert timm.is_model(cfg.name) and not cfg.name.startswith("tf_")
    assert isinstance(cfg.resolution, int) and cfg.resolution == cfg.paper.resolution
    assert 0.0 <= cfg.drop_rate < 1.0 and 0.0 <= cfg.drop_path_rate < 1.0
    assert cfg.paper.top1 > 0 and cfg.paper.macs_m > 0 and cfg.paper.params_m > 0 and cfg.paper.source


def test_timm_config_takes_its_key_from_the_model_name():
    cfg = load_config("timm")
    cfg.name = "efficientnet_b0"
    assert cfg.key == "efficientnet_b0"
    assert cfg.family == "timm" and cfg.resolution is None and cfg.paper is None


@pytest.mark.parametrize("key", PUBLISHED)
def test_every_model_config_builds_with_10_classes_and_gives_logits(key):
    model = build(key).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("key", ONE_PER_FAMILY)
def test_one_training_step_per_family_gives_finite_gradients_for_every_weight(key):
    torch.manual_seed(0)
    model = build(key).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 7]))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["classifier.weight"].abs().sum() > 0


def test_create_model_passes_dropout_and_stochastic_depth_to_timm():
    model = create_model("mobilenetv4_conv_medium", num_classes=5, drop_rate=0.3, drop_path_rate=0.1)
    drop_probs = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert model.drop_rate == 0.3
    assert drop_probs and 0.0 < max(drop_probs) <= 0.1


def test_unknown_model_name_lists_config_keys_close_timm_names_and_the_timm_option():
    with pytest.raises(UnknownModelError) as err:
        create_model("mobilenetv4_conv_smal", num_classes=10)
    message = str(err.value)
    assert isinstance(err.value, ModelConfigError) and isinstance(err.value, ValueError)
    for needle in ("mobilenetv4_conv_smal", "mnv3_l_100", "mnv4_hybrid_l", "mobilenetv4_conv_small",
                   "model=timm model.name=<timm name>"):
        assert needle in message


def test_config_key_given_as_a_timm_name_says_to_use_model_equals_key():
    with pytest.raises(UnknownModelError, match=r"model=mnv3_l_100"):
        create_model("mnv3_l_100", num_classes=10)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"num_classes": -1}, "num_classes"),
    ({"num_classes": 10, "drop_rate": 1.5}, "drop_rate"),
    ({"num_classes": 10, "drop_path_rate": -0.1}, "drop_path_rate"),
    ({"num_classes": 10, "drop_rate": "0.2"}, "drop_rate"),
    ({"num_classes": 10, "pretrained": True}, "never loads weights"),
])
def test_create_model_refuses_bad_arguments_naming_them(kwargs, needle):
    with pytest.raises(ModelConfigError, match=needle):
        create_model("mobilenetv2_050", **kwargs)


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_variant_loads_a_local_safetensors_file_through_timm(name, tmp_path):
    cfg = timm.get_pretrained_cfg(name)
    assert not cfg.url and not cfg.hf_hub_id  # nothing to download, ever
    torch.manual_seed(0)
    trained = timm.create_model(name, num_classes=7).eval()
    path = tmp_path / "model.safetensors"
    save_file(trained.state_dict(), str(path))

    loaded = timm.create_model(name, pretrained=True, num_classes=7,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=7)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))


def test_check_img_size_refuses_a_size_below_the_network_stride():
    # ModelConfigError: the CLI prints it as a clean error, as it does UnknownModelError (its subclass)
    with pytest.raises(ModelConfigError, match=r"img_size=8 .*stride \(32\).*>= 32"):
        check_img_size(build("mnv3_s_100"), 8)


@pytest.mark.parametrize("size", [32, 33, 200, 256])
def test_check_img_size_accepts_any_size_from_the_stride_up_for_a_hybrid_mobilenet(size):
    # Found empirically: timm's padding lets every MobileNet, attention blocks included, run at any size.
    check_img_size(build("mnv4_hybrid_m"), size)


@pytest.mark.parametrize("size", [0, -3, 224.0, True])
def test_check_img_size_refuses_non_positive_or_non_integer_sizes(size):
    with pytest.raises(ValueError, match="positive int"):
        check_img_size(build("mnv2_050"), size)


def test_check_img_size_names_the_sizes_a_fixed_size_model_takes():
    model = create_model("vit_tiny_patch16_224", num_classes=10).train()
    with pytest.raises(ValueError, match=r"(?s)img_size=200 does not fit.*Sizes that work.*: 224\."):
        check_img_size(model, 200)
    check_img_size(model, 224)
    assert model.training  # the real-device check ran in eval mode and gave the mode back


def test_check_img_size_leaves_weights_statistics_and_mode_untouched():
    model = build("mnv4_conv_s").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_img_size(model, 224)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_count_macs_counts_a_depthwise_conv_by_its_per_group_weights():
    depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    assert count_macs(depthwise, 16) == 32 * 3 * 3 * 16 * 16


def test_count_macs_counts_pointwise_convs_and_the_classifier():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    assert count_macs(model, 10) == 3 * 8 * 10 * 10 + 8 * 5


@pytest.mark.parametrize("fused", [True, False])
def test_count_macs_counts_multi_query_attention_matmuls_fused_or_not(fused):
    attn = MultiQueryAttention2d(32, num_heads=4, key_dim=16, value_dim=16, kv_stride=2).eval()
    attn.fused_attn = fused  # fused: F.scaled_dot_product_attention; not fused: explicit q @ k^T, attn @ v
    tokens, kv_tokens = 8 * 8, 4 * 4
    expected = (32 * 4 * 16 * tokens                              # query projection
                + 2 * (3 * 3 * 32 * kv_tokens + 32 * 16 * kv_tokens)  # key, value: stride-2 depthwise + projection
                + 4 * tokens * kv_tokens * (16 + 16)              # q k^T and attn v, 4 query heads
                + 4 * 16 * 32 * tokens)                           # output projection
    assert count_macs(attn, 8) == expected


def test_count_macs_leaves_the_model_in_training_mode():
    model = build("mnv2_035").train()
    count_macs(model, 64)
    assert model.training
