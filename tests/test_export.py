"""engine.export: every encoder the engine trains, under timm names that load with strict=True.

The main suite checks the exported names against hand-written timm key lists (written from timm's modules:
``VisionTransformer``, ``Beit``, ``ResNet``, ``ConvNeXt``), the ``timm.create_model`` call, the metadata and
the CLI's refusals. The tests marked ``timm`` load the files into real timm models (``.ci/compat.sh`` runs
them in a venv with timm) and compare the pooled features with the encoder's.
"""

import json
import subprocess
import sys

import pytest
import torch

from engine import exit_codes
from _train_helpers import fake_checkpoint, method_cfg
from torch import nn

import kernels
from engine.export import ExportError, TimmSpec, export, main, register_timm_spec, timm_spec, verify_with_timm
from engine.methods import build_method
from engine.models import build_vit
from engine.models.convnext import build_convnext
from engine.models.resnet import build_resnet

# ------------------------------------------------------------------------------------------ timm key lists

VIT_BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]


def vit_keys(depth, *, qkv_bias=True, pos_embed=True, layer_scale=False):
    """timm ``VisionTransformer`` (class token, no head)."""
    block = VIT_BLOCK + (["attn.qkv.bias"] if qkv_bias else [])
    block += ["ls1.gamma", "ls2.gamma"] if layer_scale else []
    top = {"cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    top |= {"pos_embed"} if pos_embed else set()
    return top | {f"blocks.{i}.{k}" for i in range(depth) for k in block}


def beit_keys(depth, *, qv_bias=True, pos_embed=False, layer_scale=True, shared_rel=False, rel=False):
    """timm ``Beit`` with ``use_fc_norm=False`` (``norm.*``, no ``fc_norm.*``)."""
    block = VIT_BLOCK + (["attn.q_bias", "attn.v_bias"] if qv_bias else [])
    block += ["gamma_1", "gamma_2"] if layer_scale else []
    block += ["attn.relative_position_bias_table"] if rel else []
    top = {"cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    top |= {"pos_embed"} if pos_embed else set()
    top |= {"rel_pos_bias.relative_position_bias_table"} if shared_rel else set()
    return top | {f"blocks.{i}.{k}" for i in range(depth) for k in block}


def _bn(prefix):
    return {f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def resnet_keys(layers, bottleneck):
    """timm (= torchvision) ``ResNet`` without ``fc``."""
    keys = {"conv1.weight"} | _bn("bn1")
    for stage, n in enumerate(layers, start=1):
        for j in range(n):
            b = f"layer{stage}.{j}"
            for c in range(1, 4 if bottleneck else 3):
                keys |= {f"{b}.conv{c}.weight"} | _bn(f"{b}.bn{c}")
            if j == 0 and (stage > 1 or bottleneck):
                keys |= {f"{b}.downsample.0.weight"} | _bn(f"{b}.downsample.1")
    return keys


def convnext_keys(depths):
    """timm ``ConvNeXt``: stem, per-stage downsample, blocks with layer scale, ``head.norm`` (no fc)."""
    keys = {"stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias", "head.norm.weight",
            "head.norm.bias"}
    block = ["gamma", "conv_dw.weight", "conv_dw.bias", "norm.weight", "norm.bias", "mlp.fc1.weight",
             "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    for i, n in enumerate(depths):
        if i:
            keys |= {f"stages.{i}.downsample.{a}.{b}" for a in (0, 1) for b in ("weight", "bias")}
        keys |= {f"stages.{i}.blocks.{j}.{k}" for j in range(n) for k in block}
    return keys


FEMTO_VIT = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=48, depth=2, num_heads=2, mlp_ratio=4.0)

# name -> (encoder builder, expected keys, timm model, expected kwargs or None); builders run per test
ENCODERS = {
    "vit_cls": (lambda: build_vit("vit_femto"), vit_keys(2), "vit_base_patch16_224",
                dict(num_classes=0, **FEMTO_VIT, init_values=0.0, qkv_bias=True, pos_embed="learn",
                     global_pool="token", fc_norm=False)),
    "vit_mean_layer_scale_no_pos": (
        lambda: build_vit("vit_femto", global_pool="mean", init_values=0.1, use_abs_pos_emb=False),
        vit_keys(2, pos_embed=False, layer_scale=True), "vit_base_patch16_224",
        dict(num_classes=0, **FEMTO_VIT, init_values=0.1, qkv_bias=True, pos_embed="none", global_pool="avg",
             fc_norm=False)),
    "beit_shared_mean": (  # the default job's layout (SimMIM)
        lambda: build_vit("vit_femto", qv_bias=True, use_shared_rel_pos_bias=True, use_abs_pos_emb=False,
                          init_values=0.1, global_pool="mean", use_mask_token=True),
        beit_keys(2, shared_rel=True), "beit_base_patch16_224",
        dict(num_classes=0, **FEMTO_VIT, init_values=0.1, qkv_bias=True, use_abs_pos_emb=False,
             use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="avg", use_fc_norm=False)),
    "beit_per_layer_cls": (
        lambda: build_vit("vit_femto", qv_bias=True, use_rel_pos_bias=True, use_abs_pos_emb=False,
                          init_values=0.1),
        beit_keys(2, rel=True), "beit_base_patch16_224",
        dict(num_classes=0, **FEMTO_VIT, init_values=0.1, qkv_bias=True, use_abs_pos_emb=False,
             use_rel_pos_bias=True, use_shared_rel_pos_bias=False, global_pool="token", use_fc_norm=False)),
    "beit_qv_bias_abs_pos_mean": (
        lambda: build_vit("vit_femto", qv_bias=True, global_pool="mean"),
        beit_keys(2, pos_embed=True, layer_scale=False), "beit_base_patch16_224", None),
    "beit_full_qkv_bias_rel_pos": (  # k bias dropped (it cancels in the softmax)
        lambda: build_vit("vit_femto", use_rel_pos_bias=True, global_pool="mean"),
        beit_keys(2, pos_embed=True, layer_scale=False, rel=True), "beit_base_patch16_224", None),
    "resnet18": (lambda: build_resnet("resnet18"), resnet_keys((2, 2, 2, 2), False), "resnet18",
                 dict(num_classes=0)),
    "resnet50": (lambda: build_resnet("resnet50"), resnet_keys((3, 4, 6, 3), True), "resnet50",
                 dict(num_classes=0)),
    "convnext_femto": (lambda: build_convnext("convnext_femto"), convnext_keys((1, 1, 2, 1)), "convnext_tiny",
                       dict(num_classes=0, depths=[1, 1, 2, 1], dims=[16, 32, 64, 128], patch_size=1)),
    "convnext_tiny": (lambda: build_convnext("convnext_tiny"), convnext_keys((3, 3, 9, 3)), "convnext_tiny",
                      dict(num_classes=0)),
    "convnext_no_layer_scale": (lambda: build_convnext("convnext_femto", layer_scale=0.0),
                                convnext_keys((1, 1, 2, 1)), "convnext_tiny", None),
    "resnet18_sparse": (lambda: _sparse(build_resnet("resnet18")), resnet_keys((2, 2, 2, 2), False),
                        "resnet18", dict(num_classes=0)),
    "convnext_femto_sparse": (lambda: _sparse(build_convnext("convnext_femto")), convnext_keys((1, 1, 2, 1)),
                              "convnext_tiny", None),
}


def _sparse(net):
    kernels.to_sparse(net)  # as SparK holds its encoder
    return net


def perturb(module, seed=0):
    """Random offsets on every float tensor (positive running variances) so that each of them matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():  # extra state (configs) too
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.add_(torch.randn(t.shape, generator=gen) * 0.05)
    return module


# ------------------------------------------------------------------------------------------ names and calls


@pytest.mark.parametrize("case", sorted(ENCODERS))
def test_names_match_the_timm_key_list(case):
    build, keys, model, kwargs = ENCODERS[case]
    spec = timm_spec(build())
    got = set(spec.state_dict)
    assert got == keys, (sorted(got - keys), sorted(keys - got))
    assert spec.model == model
    if kwargs is not None:
        assert spec.kwargs == kwargs
    call = spec.create_model_call()
    assert call.startswith(f'timm.create_model("{model}", pretrained=False, num_classes=0')
    assert "fc_norm.weight" not in spec.state_dict and "mask_token" not in spec.state_dict
    for t in spec.state_dict.values():
        assert t.device.type == "cpu" and t.is_contiguous()


def test_create_model_call_is_python_with_the_kwargs():
    spec = timm_spec(ENCODERS["beit_shared_mean"][0]())
    assert spec.create_model_call() == (
        'timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, '
        'patch_size=4, in_chans=3, embed_dim=48, depth=2, num_heads=2, mlp_ratio=4.0, init_values=0.1, '
        'qkv_bias=True, use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, '
        'global_pool="avg", use_fc_norm=False)')
    calls = []
    fake_timm = type("timm", (), {"create_model": staticmethod(lambda name, **kw: calls.append((name, kw)))})
    eval(spec.create_model_call(), {"timm": fake_timm})  # noqa: S307  (our own generated call)
    assert calls == [("beit_base_patch16_224", {"pretrained": False, **spec.kwargs})]


def test_default_job_encoder_layout():
    """The default job (SimMIM, vit_pico, mean pooling): Beit names, a shared rel-pos table, the pooling."""
    method = build_method("simmim", method_cfg("simmim", model="vit_pico"))
    spec = timm_spec(method.encoder())
    assert set(spec.state_dict) == beit_keys(4, shared_rel=True)
    assert spec.state_dict["rel_pos_bias.relative_position_bias_table"].shape == ((2 * 8 - 1) ** 2 + 3, 3)
    assert spec.kwargs["global_pool"] == "avg" and spec.kwargs["use_fc_norm"] is False
    assert (spec.kwargs["embed_dim"], spec.kwargs["depth"], spec.kwargs["num_heads"]) == (96, 4, 3)


def test_full_qkv_bias_becomes_q_and_v_bias():
    enc = perturb(build_vit("vit_femto", use_rel_pos_bias=True))
    sd = timm_spec(enc).state_dict
    b = enc.blocks[1].attn.qkv.bias.detach()
    assert torch.equal(sd["blocks.1.attn.q_bias"], b[:48]) and torch.equal(sd["blocks.1.attn.v_bias"], b[96:])
    assert any("k part" in n for n in timm_spec(enc).notes)


def test_no_layer_scale_convnext_exports_unit_gamma():
    spec = timm_spec(build_convnext("convnext_femto", layer_scale=0.0))
    assert torch.equal(spec.state_dict["stages.2.blocks.1.gamma"], torch.ones(64))
    assert spec.notes


def test_resnet_femto_says_it_has_no_timm_model():
    enc = build_resnet("resnet_femto")
    spec = timm_spec(enc)
    assert spec.model is None and spec.create_model_call() == ""
    assert "no timm model loads resnet_femto" in spec.notes[0]
    assert "build_resnet('resnet_femto')" in spec.notes[0]
    assert set(spec.state_dict) == set(enc.state_dict())  # torchvision/timm names, loads back into the engine
    dense = build_resnet("resnet_femto")
    dense.load_state_dict(spec.state_dict, strict=True)
    with pytest.raises(ExportError, match="no timm model"):
        spec.build()


@pytest.mark.parametrize("model", ["resnet_femto", "convnext_femto"])
def test_spark_checkpoint_encoder_is_the_dense_network(model):
    """SparK holds kernels.to_sparse's encoder; its export equals the dense network's, and loads into it."""
    method = build_method("spark", method_cfg("spark", model=model))
    perturb(method.encoder())
    sparse = method.encoder()
    assert any(type(m).__module__.startswith("kernels.") for m in sparse.modules())
    dense = build_resnet(model) if model.startswith("resnet") else build_convnext(model)
    ours, theirs = timm_spec(sparse), timm_spec(dense)
    assert ours.kwargs == theirs.kwargs and ours.model == theirs.model
    assert set(ours.state_dict) == set(theirs.state_dict)
    dense.load_state_dict(sparse.state_dict(), strict=True)
    for k, t in ours.state_dict.items():
        assert torch.equal(t, timm_spec(dense).state_dict[k]), k
    x = torch.randn(2, 3, 32, 32)
    sparse.eval(), dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ plugging in kinds


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.config = {"kind": "toy"}


def test_an_encoder_kind_plugs_in_with_a_timm_spec_method():
    class WithSpec(_Toy):
        def timm_spec(self):
            return TimmSpec.from_module(self, "toy_net", {"num_classes": 0}, "toy",
                                        rename=lambda n: "head." + n)

    spec = timm_spec(WithSpec())
    assert spec.model == "toy_net" and set(spec.state_dict) == {"head.fc.weight", "head.fc.bias"}
    assert spec.create_model_call() == 'timm.create_model("toy_net", pretrained=False, num_classes=0)'


def test_a_timm_spec_method_may_return_name_kwargs_drop():
    class DictSpec(_Toy):
        def __init__(self):
            super().__init__()
            self.mask_token = nn.Parameter(torch.zeros(3))
            self.extra = nn.Parameter(torch.zeros(1))
            self.config = {"arch": "toy"}

        def timm_spec(self):
            return {"name": "toy_net", "kwargs": {"num_classes": 0, "depths": (1, 2)}, "drop": ["extra"]}

    spec = timm_spec(DictSpec())
    assert set(spec.state_dict) == {"fc.weight", "fc.bias"} and spec.layout == "toy"
    assert spec.create_model_call() == ('timm.create_model("toy_net", pretrained=False, num_classes=0, '
                                        'depths=[1, 2])')


def test_swin_plugs_in_through_its_own_timm_spec():
    swin = pytest.importorskip("engine.models.swin")
    enc = swin.build_swin("swin_pico", use_mask_token=True)
    spec = timm_spec(enc)
    assert spec.layout == "swin" and spec.model.startswith("swin_") and spec.kwargs["num_classes"] == 0
    assert "mask_token" not in spec.state_dict and set(spec.state_dict) <= set(enc.state_dict())
    assert spec.create_model_call().startswith(f'timm.create_model("{spec.model}", pretrained=False, ')


def test_an_encoder_kind_plugs_in_with_the_registry(tmp_path):
    class Registered(_Toy):
        pass

    with pytest.raises(ExportError, match="no timm layout for a Registered encoder"):
        timm_spec(Registered())
    register_timm_spec(Registered)(
        lambda enc: TimmSpec.from_module(enc, "toy_net", {"num_classes": 0}, "toy"))
    try:
        path = export(Registered(), tmp_path / "toy.safetensors")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert set(f.keys()) == {"fc.weight", "fc.bias"} and f.metadata()["layout"] == "toy"
    finally:
        from engine import export as export_module

        export_module._SPECS.pop(Registered)


# ------------------------------------------------------------------------------------------ files


def test_metadata_holds_the_timm_call(tmp_path):
    enc = ENCODERS["beit_shared_mean"][0]()
    spec = timm_spec(enc)
    path = export(enc, tmp_path / "a" / "vit.safetensors", metadata={"method": "simmim"})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["timm_model"] == "beit_base_patch16_224"
    assert json.loads(meta["timm_kwargs"]) == spec.kwargs
    assert meta["timm_create_model"] == spec.create_model_call()
    assert json.loads(meta["config"])["global_pool"] == "mean" and meta["method"] == "simmim"
    assert meta["layout"] == "beit" and not list(tmp_path.glob("a/*.tmp-*"))


def test_export_refuses_non_finite_weights(tmp_path):
    enc = build_vit("vit_femto")
    with torch.no_grad():
        enc.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
        enc.norm.bias[3] = float("inf")
    with pytest.raises(ExportError, match=r"non-finite .* blocks\.1\.mlp\.fc1\.weight, norm\.bias"):
        export(enc, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ CLI


def _ckpt(tmp_path, method, name="ckpt", **over):
    m = build_method(method, method_cfg(method, **over))
    perturb(m.encoder())
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    fake_checkpoint(m, folder / "checkpoint-last.pt")
    return folder, m


def _cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m engine.export: error: "), err
    return lines[0]


def test_cli_writes_and_prints_the_timm_call(tmp_path, capsys):
    folder, method = _ckpt(tmp_path, "simmim")
    code, out, err = _cli(capsys, "--checkpoint", folder, "--out", tmp_path / "vit.safetensors")
    assert code == 0, err
    spec = timm_spec(method.encoder())
    assert f"load with: model = {spec.create_model_call()}" in out
    assert f'safetensors.torch.load_file("{tmp_path / "vit.safetensors"}"), strict=True)' in out
    assert "the vit_femto encoder of --method simmim" in out


def test_cli_refuses_an_existing_out_without_force(tmp_path, capsys):
    folder, _ = _ckpt(tmp_path, "dino")
    out = tmp_path / "vit.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = _cli(capsys, "--checkpoint", folder, "--out", out)
    assert code == 2 and f"--out {out} exists; pass --force to overwrite it" in _one_error_line(err)
    assert out.read_bytes() == b"keep me"
    code, stdout, err = _cli(capsys, "--checkpoint", folder, "--out", out, "--force")
    assert code == 0, err
    assert out.read_bytes()[:8] != b"keep me" and 'global_pool="token"' in stdout


@pytest.mark.parametrize("form", ["folder", "file", "dotted"])
def test_cli_never_writes_over_its_input(tmp_path, capsys, form):
    folder, _ = _ckpt(tmp_path, "simmim")
    ckpt = folder / "checkpoint-last.pt"
    before = ckpt.read_bytes()
    source = folder if form == "folder" else ckpt
    out = ckpt if form != "dotted" else folder / ".." / folder.name / "checkpoint-last.pt"
    code, _, err = _cli(capsys, "--checkpoint", source, "--out", out, "--force")
    assert code == 2 and "is the input checkpoint; refusing to write over it" in _one_error_line(err)
    assert ckpt.read_bytes() == before


def test_cli_refuses_non_finite_checkpoints(tmp_path, capsys):
    m = build_method("simmim", method_cfg("simmim"))
    with torch.no_grad():
        m.encoder().blocks[0].attn.qkv.weight[1, 2] = float("nan")
    fake_checkpoint(m, tmp_path / "bad.pt")
    code, _, err = _cli(capsys, "--checkpoint", tmp_path / "bad.pt", "--out", tmp_path / "x.safetensors")
    line = _one_error_line(err)  # the checkpoint loader's error: the checkpoint-error exit status
    assert code == exit_codes.CHECKPOINT and "nan/inf" in line.lower(), line
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_cli_unreadable_checkpoint_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "c.pt"
    if content is None:  # a truncated real checkpoint
        _ckpt(tmp_path, "dino")
        data = (tmp_path / "ckpt" / "checkpoint-last.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    code, _, err = _cli(capsys, "--checkpoint", path, "--out", tmp_path / "x.safetensors")
    assert code == exit_codes.CHECKPOINT and str(path) in _one_error_line(err)


def test_cli_missing_checkpoint_and_folder_out(tmp_path, capsys):
    code, _, err = _cli(capsys, "--checkpoint", tmp_path / "nope", "--out", tmp_path / "x.safetensors")
    assert code == 2 and "no checkpoint" in _one_error_line(err)
    code, _, err = _cli(capsys, "--checkpoint", tmp_path / "nope", "--out", tmp_path)
    assert code == 2 and "is a folder" in _one_error_line(err)


def test_cli_tokenizer_checkpoints(tmp_path, capsys):
    dvae, _ = _ckpt(tmp_path, "dvae", name="dvae")
    code, _, err = _cli(capsys, "--checkpoint", dvae, "--out", tmp_path / "d.safetensors")
    line = _one_error_line(err)
    assert code == 2 and "--method dvae" in line and "encoders only" in line and "--tokenizer" in line
    assert not (tmp_path / "d.safetensors").exists()
    vqkd, _ = _ckpt(tmp_path, "vqkd", name="vqkd")
    code, out, err = _cli(capsys, "--checkpoint", vqkd, "--out", tmp_path / "v.safetensors")
    assert code == 0, err
    assert "note: a --method vqkd checkpoint is a tokenizer: exported its ViT encoder only" in out
    assert "timm layout vit" in out


def test_cli_spark_femto_says_no_timm_model(tmp_path, capsys):
    folder, _ = _ckpt(tmp_path, "spark", model="resnet_femto")
    code, out, err = _cli(capsys, "--checkpoint", folder, "--out", tmp_path / "r.safetensors")
    assert code == 0, err
    assert "load with" not in out and "note: no timm model loads resnet_femto" in out


def test_cli_subprocess_refuses_to_overwrite_its_input(tmp_path):
    """The issue's command: --checkpoint out/ref --out out/ref/checkpoint-last.pt."""
    folder, _ = _ckpt(tmp_path, "simmim", name="ref")
    before = (folder / "checkpoint-last.pt").read_bytes()
    res = subprocess.run([sys.executable, "-m", "engine.export", "--checkpoint", str(folder), "--out",
                          str(folder / "checkpoint-last.pt")], capture_output=True, text=True, cwd=tmp_path,
                         check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "is the input checkpoint" in res.stderr
    assert (folder / "checkpoint-last.pt").read_bytes() == before


# ------------------------------------------------------------------------------------------ real timm


def _timm():
    return pytest.importorskip("timm")


@pytest.mark.timm
@pytest.mark.parametrize("case", sorted(set(ENCODERS) - {"convnext_tiny"}))  # convnext_femto's code path
def test_timm_loads_every_encoder_kind(case, tmp_path):
    timm = _timm()
    build, keys, model, _ = ENCODERS[case]
    enc = perturb(build())
    spec = timm_spec(enc)
    assert spec.model == model
    path = export(enc, tmp_path / "e.safetensors", spec=spec)
    reference = spec.build()
    assert set(reference.state_dict()) == keys, "the hand-written key list is timm's"
    if spec.layout in ("vit", "beit"):  # strict load + pooled features: ViTs in float64, convnets in float32
        assert verify_with_timm(enc, path, spec, dtype=torch.float64) < 1e-9
    else:
        verify_with_timm(enc, path, spec, image_size=32)
    assert timm.__version__


@pytest.mark.timm
def test_timm_loads_a_swin_export(tmp_path):
    _timm()
    swin = pytest.importorskip("engine.models.swin")
    enc = perturb(swin.build_swin("swin_pico"))
    spec = timm_spec(enc)
    path = export(enc, tmp_path / "s.safetensors", spec=spec)
    assert verify_with_timm(enc, path, spec, dtype=torch.float64) < 1e-9


@pytest.mark.timm
def test_timm_default_pooling_expects_other_keys_and_features(tmp_path):
    """Why the kwargs: with timm's default avg pooling (fc_norm) the file does not load, and a hand-renamed
    one gives other features."""
    timm = _timm()
    enc = perturb(ENCODERS["beit_shared_mean"][0]())
    spec = timm_spec(enc)
    default = {k: v for k, v in spec.kwargs.items() if k != "use_fc_norm"}
    model = timm.create_model(spec.model, pretrained=False, **default)
    missing, unexpected = model.load_state_dict(spec.state_dict, strict=False)
    assert set(missing) == {"fc_norm.weight", "fc_norm.bias"}
    assert set(unexpected) == {"norm.weight", "norm.bias"}
    renamed = {("fc_" + k if k.startswith("norm.") else k): v for k, v in spec.state_dict.items()}
    model.load_state_dict(renamed, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), enc.eval()(x), atol=1e-3)


METHODS = {  # method -> cfg overrides (CPU sizes)
    "simmim": {"model": "vit_pico"},
    "dino": {},
    "vqkd": {},
    "beit": {},  # tokenizer: a dvae checkpoint, made in the test
    "beitv2": {},  # tokenizer: a vqkd checkpoint
    "spark_resnet18": {"model": "resnet18", "image_size": 64, "decoder_width": 64},
    "spark_convnext_femto": {"model": "convnext_femto"},
}


@pytest.mark.timm
@pytest.mark.parametrize("name", sorted(METHODS))
def test_timm_loads_the_export_of_each_method_as_users_load_it(name, tmp_path, capsys):
    timm = _timm()
    from safetensors import safe_open
    from safetensors.torch import load_file

    from engine.eval import encoder_from_checkpoint, load_checkpoint

    method, over = name.split("_")[0], dict(METHODS[name])
    if method in ("beit", "beitv2"):
        tok, _ = _ckpt(tmp_path, "dvae" if method == "beit" else "vqkd", name="tokenizer")
        over["tokenizer"] = str(tok)
    folder, _ = _ckpt(tmp_path, method, **over)
    out = tmp_path / "enc.safetensors"
    code, stdout, err = _cli(capsys, "--checkpoint", folder, "--out", out, "--verify")
    assert code == 0, err
    assert "verified: timm's" in stdout
    with safe_open(str(out), "pt") as f:
        call = f.metadata()["timm_create_model"]
    assert f"load with: model = {call}" in stdout
    model = eval(call, {"timm": timm})  # noqa: S307  (the printed call, as a user pastes it)
    model.load_state_dict(load_file(str(out)), strict=True)
    encoder, cfg = encoder_from_checkpoint(load_checkpoint(folder))
    size = int(cfg["image_size"])
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), encoder.eval()(x), atol=2e-5, rtol=1e-4)


@pytest.mark.timm
def test_timm_default_job_end_to_end(tmp_path):
    """The default job's checkpoint, exported by the CLI, in timm's Beit with mean pooling: same features."""
    timm = _timm()
    from safetensors import safe_open
    from safetensors.torch import load_file

    from engine.eval import encoder_from_checkpoint, load_checkpoint

    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "engine.pretrain", "--max-steps", "2", "--output-dir",
                          str(run), "--no-final-knn"], capture_output=True, text=True, cwd=tmp_path,
                         check=False, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "vit.safetensors"
    res = subprocess.run([sys.executable, "-m", "engine.export", "--checkpoint", str(run), "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr
    assert 'timm.create_model("beit_base_patch16_224"' in res.stdout and 'global_pool="avg"' in res.stdout
    with safe_open(str(out), "pt") as f:
        model = eval(f.metadata()["timm_create_model"], {"timm": timm})  # noqa: S307
    model.load_state_dict(load_file(str(out)), strict=True)
    encoder, _ = encoder_from_checkpoint(load_checkpoint(run))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), encoder.eval()(x), atol=2e-5, rtol=1e-4)
