"""Model-name parsing and the variant table."""

import pytest

from keras_vit import configs


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ViT-B_16", dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, classifier="token", name="ViT-B_16")),
        ("B/16", dict(patch_size=16, hidden_size=768, name="ViT-B_16")),
        ("Ti/16", dict(hidden_size=192, num_heads=3, mlp_dim=768, name="ViT-Ti_16")),
        ("S/32-gap", dict(patch_size=32, hidden_size=384, classifier="gap", name="ViT-S_32-gap")),
        ("ViT-S_16-gap-norep", dict(classifier="gap", representation_size=None, name="ViT-S_16-gap-norep")),
        ("ViT-H_14", dict(patch_size=14, hidden_size=1280, num_layers=32, num_heads=16, mlp_dim=5120)),
        ("L/32", dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096)),
    ],
)
def test_model_config(name, expected):
    config = configs.model_config(name)
    assert {k: config[k] for k in expected} == expected


@pytest.mark.parametrize("name", ["ViT-X_16", "B16", "vit-b_16", "B/16-foo", "", "ViT-B_"])
def test_unknown_names_list_the_valid_ones(name):
    with pytest.raises(ValueError, match="Valid names are the official ones ViT-Ti_16, ViT-S_16"):
        configs.model_config(name)


def test_list_models_are_all_parseable():
    names = configs.list_models()
    # the 14 of the official code (plain, then hybrid), then the patch-14 variants timm's weights need
    assert names[:1] == ["ViT-Ti_16"] and names[8:10] == ["ViT-H_14", "R+ViT-Ti_16"]
    assert names[13:] == ["R50+ViT-L_32", "ViT-S_14", "ViT-B_14", "ViT-L_14"]
    assert [configs.model_config(n)["name"] for n in names] == names
