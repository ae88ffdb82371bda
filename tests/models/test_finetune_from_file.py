"""Fine-tuning from a finegrain file (the demo's pretrain -> fine-tune path, ``--init-weights``).

A pretraining run's ``weights.safetensors`` + ``model.json`` loads into another input size
(position embeddings resampled, not left random), into the method twin of the same model name
(the recipe's ``glca=True`` wins over the file's ``glca=False``), and into another model family
that shares the backbone (DALG on the DCAL baseline's weights).
"""

import json

import timm
import torch
from safetensors.torch import save_file

from finegrain.models import create_model
from finegrain.models.tiny import TEST_HYBRID_VIT
from finegrain.models.weights import _backbone_filter

NAME = "dcal_vit_tiny_r_s16_p8_224"
KW = {"drop_path_rate": 0.0, "backbone_kwargs": TEST_HYBRID_VIT}


def _pretrained_file(tmp_path):
    torch.manual_seed(0)
    twin = create_model(NAME, num_classes=7, img_size=32, glca=False, pwca=False, **KW)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, str(path))
    meta = {"model_name": NAME, "model_kwargs": {"num_classes": 7, "img_size": 32,
                                                 "glca": False, "pwca": False, **KW}}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    return twin, str(path)


def test_reid_input_size_resamples_position_embeddings(tmp_path):
    twin, path = _pretrained_file(tmp_path)
    model = create_model(NAME, pretrained=path, inherit_kwargs=False, num_classes=5,
                         img_size=(32, 16), task="reid", glca=True, pwca=True, **KW)
    ref = timm.create_model("vit_tiny_r_s16_p8_224", num_classes=0, img_size=(32, 16),
                            **TEST_HYBRID_VIT)
    expected = _backbone_filter(ref, {k[9:]: v for k, v in twin.state_dict().items()
                                      if k.startswith("backbone.")})["pos_embed"]
    assert model.backbone.pos_embed.shape == expected.shape == (1, 1 + 4 * 2, 32)
    torch.testing.assert_close(model.backbone.pos_embed.detach(), expected)
    torch.testing.assert_close(model.backbone.blocks[0].attn.qkv.weight,
                               twin.backbone.blocks[0].attn.qkv.weight)
    # the method's own parts: GLCA copied from the loaded last block, new head (7 -> 5 skipped)
    torch.testing.assert_close(model.glca_block.block.mlp.fc1.weight,
                               twin.backbone.blocks[-1].mlp.fc1.weight)
    assert model.head.weight.shape == (5, 32)


def test_recipe_kwargs_win_over_the_files(tmp_path):
    _, path = _pretrained_file(tmp_path)
    method = create_model(NAME, pretrained=path, inherit_kwargs=False, num_classes=5,
                          img_size=32, **KW)
    assert method.glca and method.pwca  # the registry defaults, not the file's twin switches
    rebuilt = create_model(NAME, pretrained=path)  # Python API: the file describes itself
    assert not rebuilt.glca and not rebuilt.pwca and rebuilt.head.weight.shape == (7, 32)


def test_another_family_on_the_same_backbone(tmp_path):
    twin, path = _pretrained_file(tmp_path)
    dalg = create_model("dalg_vit_tiny_r_s16_p8_224", pretrained=path, num_classes=5,
                        img_size=32, global_dim=32, local_dim=32, embedding_dim=16,
                        window_size=2, fusion_heads=2, **KW)  # no DCAL arguments leak in
    torch.testing.assert_close(dalg.backbone.blocks[1].mlp.fc2.weight,
                               twin.backbone.blocks[1].mlp.fc2.weight)
