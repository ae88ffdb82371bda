"""``finegrain export`` (ONNX, torch.export, timm weights) with its parity check, and the
exported models run by ``predict`` / ``embed`` (``--runtime onnx``).

Every method family is exported to ONNX at its tiny size (the formats' hard parts: DCAL's
rollout + top-R gather + GLCA, TASN's sampler with its stable sort and searchsorted, DALG's
window attention + fusion, the cross-image model without its conditional branch); the whole
registry in both formats is the slow test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from finegrain import create_model, list_models
from finegrain.cli import main
from finegrain.data.synthetic import FGVCConfig, generate_cub
from finegrain.export import ParityError, compare_outputs, export
from finegrain.inference import predict
from finegrain.models.registry import config_meta, load_model
from finegrain.models.tiny import family, tiny_kwargs
from finegrain.errors import InputError
from finegrain.runtime import load_exported

NUM_IMAGES = 6
TASKS = {"cross_image": "dml", "dalg": "retrieval"}


def _checkpoint(tmp, name: str, **kw) -> str:
    """A finegrain ``.ckpt`` of the tiny ``name`` (seeded weights, a 4-class meta)."""
    torch.manual_seed(0)
    kwargs = {**tiny_kwargs(name), **kw, "num_classes": 4}
    model = create_model(name, **kwargs)
    meta = {**config_meta(model.finegrain_config), "img_size": 32, "mean": [0.5] * 3,
            "std": [0.25] * 3, "task": TASKS.get(family(name), "classification"),
            "class_names": ["a", "b", "c", "d"], "dataset": "synthetic_fgvc"}  # as training
    path = tmp / f"{name}{''.join(f'-{k}' for k in kw)}.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "finegrain_meta": meta}, path)
    return str(path)


def _check_report(report: dict, out, fmt: str) -> None:
    assert report["passed"] and report["format"] == fmt
    assert report["batches"] == [1, NUM_IMAGES - 1]  # both sizes of the dynamic batch axis
    assert json.loads((out / "parity.json").read_text()) == report
    for k, r in report["outputs"].items():
        assert r["rel_max"] <= report["tolerance"] == 1e-4, (k, r)
        assert r.get("top1_agreement", r.get("nn_agreement")) == 1.0, (k, r)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Export folders by case: the ONNX export of each method (DCAL, TASN, DALG, cross-image),
    the cross-image model as a torch.export program, DCAL's SA-only option as one too (through
    the ``finegrain export`` command) and a timm backbone. Plain classifiers: the slow test."""
    tmp = tmp_path_factory.mktemp("export")
    cases = {"dcal": ("dcal_deit_tiny_patch16_224", {}, "onnx"),
             "tasn": ("tasn_resnet18", {}, "onnx"),
             "dalg": ("dalg_deit_tiny_patch16_224", {}, "onnx"),
             "cross_image": ("cross_image_resnet18", {}, "onnx"),
             "cross_image_exported": ("cross_image_resnet18", {}, "exported"),
             "timm": ("dalg_deit_tiny_patch16_224", {}, "timm")}
    res = {}
    for case, (name, kw, fmt) in cases.items():
        ckpt, out = _checkpoint(tmp, name, **kw), tmp / case
        res[case] = (ckpt, out, export(ckpt, str(out), fmt, num_images=NUM_IMAGES))
    ckpt, out = _checkpoint(tmp, "dcal_deit_tiny_patch16_224"), tmp / "dcal_sa_only"
    assert main(["export", ckpt, "--format", "exported", "--out", str(out), "--sa-only",
                 "--num-images", str(NUM_IMAGES)]) == 0
    res["dcal_sa_only"] = (ckpt, out, json.loads((out / "parity.json").read_text()))
    return res


@pytest.mark.parametrize("case", ["dcal", "tasn", "dalg", "cross_image",
                                  "cross_image_exported", "dcal_sa_only"])
def test_export_matches_pytorch(exports, case):
    ckpt, out, report = exports[case]
    fmt = json.loads((out / "export.json").read_text())["format"]
    _check_report(report, out, fmt)
    model, meta = load_model(ckpt, **({"sa_only": True} if case == "dcal_sa_only" else {}))
    exported, emeta = load_exported(str(out))
    assert emeta.class_names == meta.class_names and emeta.checkpoint_hash is not None
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref, got = model(x), exported(x)
        assert set(got) == set(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-4 * ref[k].abs().max())
    steps = json.loads((out / "preprocess.json").read_text())["steps"]
    crop = [] if meta.task == "retrieval" else ["center_crop"]  # a batch: plain resize
    assert [s["op"] for s in steps] == ["resize", *crop, "to_float", "normalize"]
    assert steps[-1] == {"op": "normalize", "mean": [0.5] * 3, "std": [0.25] * 3}


def test_sa_only_export_drops_glca(exports):
    _, out, _ = exports["dcal_sa_only"]
    info = json.loads((out / "export.json").read_text())
    assert info["model_overrides"] == {"sa_only": True}
    assert json.loads((out / "model.json").read_text())["model_kwargs"]["sa_only"] is True


def test_cross_image_export_has_no_conditional_branch(exports):
    import onnx
    from safetensors.torch import load_file
    ckpt, out, _ = exports["cross_image"]
    assert "cross." in "".join(load_model(ckpt)[0].state_dict())  # the checkpoint has it
    weights = load_file(str(out / "weights.safetensors"))
    assert weights and not [k for k in weights if k.startswith("cross.")]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not [i.name for i in graph.initializer if "cross" in i.name]
    _, pt2, _ = exports["cross_image_exported"]
    program = torch.export.load(str(pt2 / "model.pt2"))
    assert not [k for k in program.state_dict if k.startswith("model.cross.")]
    # the weights beside the export rebuild the inference model alone
    model, meta = load_model(str(out / "weights.safetensors"))
    assert model.cross is None and meta.model_kwargs["cross_attention"] is False
    assert yaml.safe_load(meta.model_config)["init_args"]["cross_attention"] is False
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["embedding"], load_model(ckpt)[0](x)["embedding"])


def test_timm_weights_load_without_key_edits(exports):
    import timm
    from safetensors.torch import load_file
    ckpt, out, report = exports["timm"]
    _check_report(report, out, "timm")
    sd = load_file(str(out / "backbone.safetensors"))
    assert not [k for k in sd if k.startswith("backbone.")]
    info = json.loads((out / "timm.json").read_text())
    backbone = timm.create_model(info["model_name"], pretrained=True, **info["kwargs"],
                                 pretrained_cfg_overlay=dict(file=str(out / info["file"])))
    own = load_model(ckpt)[0].backbone.state_dict()
    assert set(backbone.state_dict()) == set(own)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, own[k]), k


def _images(tmp_path) -> list[str]:
    """Six generated 48 px JPEG files under ``tmp_path``; returns the first three."""
    generate_cub(str(tmp_path), FGVCConfig(num_classes=2, train_per_class=1, test_per_class=2,
                                           size=48))
    return sorted(str(p) for p in tmp_path.rglob("*.jpg"))[:3]


def test_predict_runs_the_onnx_export(exports, tmp_path, capsys):
    ckpt, out, _ = exports["dcal"]
    imgs = _images(tmp_path)
    ref = predict(ckpt, imgs, topk=4)
    got = predict(str(out), imgs, topk=4, runtime="onnx")
    for r, g in zip(ref, got):
        assert [t["index"] for t in r["top"]] == [t["index"] for t in g["top"]]
        np.testing.assert_allclose([t["prob"] for t in g["top"]],
                                   [t["prob"] for t in r["top"]], atol=1e-5)
    assert main(["predict", str(out), imgs[0], "--runtime", "onnx", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0] == got[0]["top"][0]
    assert main(["predict", ckpt, imgs[0], "--runtime", "onnx"]) == 2  # not an export
    assert "finegrain export" in capsys.readouterr().err


def test_embed_runs_the_onnx_export(exports, tmp_path):
    ckpt, out, _ = exports["cross_image"]
    _images(tmp_path)
    folder = str(tmp_path)
    common = ["--images", folder, "--num-workers", "0", "--accelerator", "cpu"]
    assert main(["embed", ckpt, "--out", str(tmp_path / "ref"), *common]) == 0
    assert main(["embed", str(out), "--runtime", "onnx", "--out", str(tmp_path / "onnx"),
                 *common]) == 0
    ref, got = np.load(tmp_path / "ref.npy"), np.load(tmp_path / "onnx.npy")
    assert ref.shape == got.shape and ref.shape[0] >= 4
    np.testing.assert_allclose(got, ref, atol=1e-4)
    m_ref = json.loads((tmp_path / "ref.json").read_text())
    m_got = json.loads((tmp_path / "onnx.json").read_text())
    assert m_got["checkpoint_hash"] == m_ref["checkpoint_hash"]  # same model, same hash


def test_parity_failure_raises_and_keeps_the_numbers(tmp_path):
    ckpt, out = _checkpoint(tmp_path, "resnet18"), tmp_path / "out"
    with pytest.raises(ParityError, match="parity.json"):
        export(ckpt, str(out), "exported", num_images=2, tolerance=-1.0)  # nothing passes
    report = json.loads((out / "parity.json").read_text())
    assert not report["passed"] and report["outputs"]["logits"]["max_abs"] < 1e-4


def test_onnx_translation_of_searchsorted(tmp_path):
    """TASN's one op that ONNX has no direct form for, on ties: the inverse CDF's searchsorted
    (left and right, values equal to sequence entries)."""
    import onnxruntime as ort

    from finegrain.export import write_onnx

    class Ops(torch.nn.Module):
        def forward(self, x):  # (B, 6, 2, 2)
            cdf = x.flatten(1).abs().cumsum(1)  # (B, 24), non-decreasing, with flat runs
            u = cdf[:, ::3].contiguous()  # equal to entries of cdf
            return torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, u)

    x = torch.randn(3, 6, 2, 2, generator=torch.Generator().manual_seed(0))
    x[:, 1] = x[:, 3] = 0  # flat runs of the cdf
    keys, path = ["right", "left"], str(tmp_path / "ops.onnx")
    write_onnx(Ops().eval(), x, keys, path)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        keys, {"images": x.numpy()})
    for k, g, r in zip(keys, got, Ops()(x)):
        np.testing.assert_array_equal(g, r.numpy(), err_msg=k)
    assert (got[0] != got[1]).any()  # the ties make left and right differ


def test_compare_outputs_numbers():
    ref = {"logits": torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
           "embedding": torch.eye(3)[:3]}
    got = {"logits": torch.tensor([[1.0, 0.0], [0.5, 0.0]]), "embedding": torch.eye(3)}
    res = compare_outputs(ref, got, 1e-4)
    lg = res["logits"]
    assert lg["max_abs"] == 2.0 and lg["mean_abs"] == 2.5 / 4 and lg["scale"] == 2.0
    assert lg["rel_max"] == 1.0 and lg["top1_agreement"] == 0.5 and not lg["passed"]
    assert res["embedding"]["passed"] and res["embedding"]["nn_agreement"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "exported"])
@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports(tmp_path, name, fmt):
    ckpt, out = _checkpoint(tmp_path, name), tmp_path / "out"
    _check_report(export(ckpt, str(out), fmt, num_images=NUM_IMAGES), out, fmt)


def test_an_interrupted_re_export_is_refused_not_mixed(tmp_path, monkeypatch, capsys):
    """parity.json is removed first and written last: an export stopped in between (a kill,
    Ctrl-C, a full disk) leaves a folder that predict refuses, naming the fix, instead of a
    new model file beside the previous export's records."""
    import finegrain.export as fx
    ckpt, out = _checkpoint(tmp_path, "resnet18"), tmp_path / "out"
    export(ckpt, str(out), "exported", num_images=2)
    img = _images(tmp_path)[0]
    assert main(["predict", str(out), img]) == 0

    def stopped(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(fx, "check_parity", stopped)
    with pytest.raises(KeyboardInterrupt):
        export(ckpt, str(out), "exported", num_images=2)
    monkeypatch.undo()
    assert not (out / "parity.json").exists()
    with pytest.raises(InputError, match="interrupted export: parity.json.*missing"):
        load_exported(str(out))
    capsys.readouterr()
    assert main(["predict", str(out), img]) == 2
    assert "run 'finegrain export CHECKPOINT" in capsys.readouterr().err
    export(ckpt, str(out), "exported", num_images=2)  # the rerun completes the folder
    assert main(["predict", str(out), img]) == 0


@pytest.mark.parametrize("case,dynamic", [("dalg", True), ("cross_image", True),
                                          ("cross_image_exported", False), ("dcal", False),
                                          ("tasn", True)])
def test_an_onnx_export_takes_any_size_where_search_embeds_photos_whole(exports, case,
                                                                        dynamic):
    """An ONNX export of a model with an embedding that takes any size is dynamic in height
    and width, checked at the sizes search gives photos (TASN too: it resizes to its attention
    size inside); the others stay fixed (.pt2, DCAL's ViT)."""
    ckpt, out, report = exports[case]
    info = json.loads((out / "export.json").read_text())
    assert info["dynamic"] == {"batch": True, "height": dynamic, "width": dynamic}
    assert ("search" in report) is dynamic
    if not dynamic:
        return
    assert report["search"]["sizes"] == [[24, 32], [32, 24]] and report["search"]["passed"]
    model, _ = load_model(ckpt)
    exported, _ = load_exported(str(out))
    for h, w in ((40, 28), (28, 40), (64, 40), (32, 32)):  # photos' sizes: other token grids
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            ref, got = model(x)["embedding"], exported(x)["embedding"]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max())
    search = json.loads((out / "preprocess.json").read_text())["search"]
    assert search["steps"][0]["rule"] == "longest_side" and search["steps"][0]["size"] == 32


def test_tasn_resizes_to_its_attention_size_inside_an_exported_graph(tmp_path):
    """The resize to ``attention_size`` stays in a graph traced at that size (a branch on the
    example's size would be traced away): a dynamic-size ONNX graph of TASN equals eager on
    another size (relative error 0.08 to 0.14 without it)."""
    import onnxruntime as ort

    from finegrain.export import _OutputTuple, inference_model, write_onnx
    model, meta = load_model(_checkpoint(tmp_path, "tasn_resnet18"))
    model, meta = inference_model(model, meta)
    example = torch.randn(2, 3, *model.attention_size, generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / "tasn.onnx")
    write_onnx(_OutputTuple(model, ["logits"]).eval(), example, ["logits"], path,
               dynamic_size=True)
    x = torch.randn(2, 3, 40, 28, generator=torch.Generator().manual_seed(1))
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        ["logits"], {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x)["logits"].numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_cross_image_model_on_an_unregistered_backbone_exports_without_its_branch(tmp_path):
    """What export drops is the model's own fact, not read from a registered name: a recipe on
    ResNet-34 (no registered name) kept the training-only ``cross.*`` branch."""
    from safetensors.torch import load_file

    from finegrain.models.cross_image import CrossImageDML
    from finegrain.models.registry import build
    torch.manual_seed(0)
    kwargs = {**tiny_kwargs("cross_image_resnet18"), "backbone": "resnet34", "num_classes": 4}
    model = build(CrossImageDML, **kwargs)
    meta = {**config_meta(model.finegrain_config), "img_size": 32, "mean": [0.5] * 3,
            "std": [0.25] * 3, "task": "dml", "class_names": list("abcd")}
    assert not meta["model_name"].startswith("cross_image_")
    ckpt = tmp_path / "r34.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "finegrain_meta": meta}, ckpt)
    out = tmp_path / "out"
    export(str(ckpt), str(out), "exported", num_images=2)
    weights = load_file(str(out / "weights.safetensors"))
    assert weights and not [k for k in weights if k.startswith("cross.")]
    assert json.loads((out / "model.json").read_text())["model_kwargs"]["cross_attention"] \
        is False
