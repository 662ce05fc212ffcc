"""Fine-tuning as the papers evaluate it: a pre-trained backbone + a classifier, trained end to end by the same
loop as pre-training (``python -m engine.finetune``; this is ``--method finetune``).

Model (built from ``cfg["backbone"]``, the pre-trained encoder's architecture, which :mod:`engine.finetune`
reads from ``--checkpoint``)::

    ViT, mean pooling (BEiT, BEiT v2, SimMIM):  logits = head(fc_norm(mean_i x_i))   x = blocks(embed(img))
                                                (the encoder's final norm is dropped, fc_norm is new)
    ViT, [CLS] pooling (DINO, ``--pool cls``):  logits = head(norm(x)[:, 0])
    Swin (SimMIM, ``--model swin_*``):           logits = head(mean_i norm(x)_i)  (the encoder's final norm kept,
                                                as SimMIM's Swin: norm, avgpool, head)
    ResNet / ConvNeXt (SparK):                  logits = head(GAP(features))     (ConvNeXt: LN after the GAP)

with ``drop_path`` as stochastic depth, BEiT-style relative position bias as one table per layer (a shared
pre-training table is copied into every layer; tables and absolute position embeddings are resampled when
the resolution differs, :mod:`engine.models.pos_embed`). Swin's relative position tables are per block already;
when the fine-tuning window differs (SimMIM: pre-trained at 192 px / window 6, fine-tuned at 224 px /
``--window-size 7``) each is resampled with the same geometric rule (SimMIM ``remap_pretrained_keys_swin``), and a
window that does not tile the stage maps at ``--image-size`` is refused with the windows that would
(:func:`check_swin_window`). The head is initialised trunc-normal std 0.02 times ``head_init_scale`` (BEiT's
``init_scale``, 0.001 for ViTs; 1.0 for Swin, as SimMIM's Swin ``_init_weights``, and for convnets, which keeps
timm's ResNet ``fc`` init and ConvNeXt's trunc-normal 0.02), zero bias.

Loss: per batch, mixup / cutmix and label smoothing give soft targets (:mod:`engine.data.mixup`; the loader
draws the parameters) and the loss is the soft-target cross-entropy (``--loss ce``; it equals timm's
label-smoothing cross-entropy when nothing is mixed) or the mean binary cross-entropy (``--loss bce``, SparK's
LAMB recipe).

Optimiser groups (:meth:`FineTune.optimizer_groups`), one per (layer, decay or not), with ``lr_scale =
layer_decay ** (L + 1 - layer_id)`` over ``L + 2`` layer ids:

* ViT (unilm ``beit/optim_factory.py`` = SimMIM ``get_vit_layer``): ``cls_token``, ``mask_token``,
  ``pos_embed``, ``patch_embed.*`` -> 0; ``blocks.i.*`` -> i + 1; everything else (a shared ``rel_pos_bias``,
  ``norm``, ``fc_norm``, ``head``) -> L + 1. No weight decay on 1-D parameters, ``*.bias``, ``pos_embed`` and
  ``cls_token`` (the models' ``no_weight_decay()``); relative position tables *are* decayed, as in both
  official scripts (BEiT's ``--disable_weight_decay_on_rel_pos_bias`` is off by default).
* Swin (SimMIM ``optimizer.py`` ``get_swin_layer``, ``N = sum(depths)``): ``mask_token``, ``patch_embed.*`` -> 0;
  block j of stage s (``layers.s.blocks.j.*``) -> ``sum(depths[:s]) + j + 1``; the patch merging between stage
  s - 1 and s (``layers.s.downsample.*`` in timm's layout, SimMIM's ``layers.{s-1}.downsample``) ->
  ``sum(depths[:s])``, the id of the last block before it; everything else (``norm``, ``head``, and
  ``absolute_pos_embed`` as in the official function, whose last branch takes it) -> N + 1. Default decay 0.9
  (SimMIM Swin-B 100-epoch recipe; 0.8 after 800 epochs, 0.7 for Swin-L). No weight decay on 1-D parameters,
  ``*.bias``, ``absolute_pos_embed`` and the relative position tables (Swin's ``no_weight_decay()`` /
  ``no_weight_decay_keywords()``).
* ResNet (SparK ``downstream_imagenet/models``): stem -> 0, ``layer1`` -> 1, ``layer2`` -> 2 + b // blk2,
  ``layer3`` -> 2 + N2 + b // blk3, ``layer4`` -> N, ``fc``/head -> N + 1, with SparK's (blk2, blk3) per depth
  ((2, 3) for ResNet-50/101, (4, 4) for 152/200) and ``ceil(L / 2)`` for the CPU/other depths (our extension);
  ConvNeXt: downsample 0 -> 0, stages 0/1 -> 1/2, stage 2 -> 3 + b // 3, stage 3 and the last downsample -> N,
  the rest -> N + 1 (N = 12 if stage 2 has > 9 blocks else 6). No weight decay on 1-D parameters, ``*.bias``
  and names containing ``cls_token``, ``pos_embed``, ``mask_token`` or ``gamma``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.data.mixup import LOSSES, mix_batch
from engine.methods import register
from engine.methods.base import PretrainMethod, backbone_from_cfg
from engine.methods.pretrained import ENCODER_PREFIX, KINDS, Source, build_encoder, kind_of, load_source
from engine.trainer.config import Option

MEAN_POOL_METHODS = ("simmim", "beit", "beitv2")
VIT_NO_WD = ("pos_embed", "cls_token")
CONV_NO_WD_KEYS = ("cls_token", "pos_embed", "mask_token", "gamma")
SWIN_NO_WD_KEYS = ("absolute_pos_embed", "relative_position_bias_table")
DEFAULT_LAYER_DECAY = {"vit": 0.65, "swin": 0.9, "resnet": 0.7, "convnext": 0.7}
_RUN_BY = "--method finetune is run by python -m engine.finetune (it reads the backbone from --checkpoint)"


# ------------------------------------------------------------------------------------------------ fine-tuning config
def finetune_vit_config(config: dict, cfg: dict, pool: str) -> dict:
    """The fine-tuning ViT's config from the pre-trained one: the run's resolution and drop path, no mask
    token, per-layer relative position tables where pre-training shared one (BEiT/SimMIM fine-tuning)."""
    c = dict(config)
    c.update(img_size=int(cfg["image_size"]), use_mask_token=False, global_pool=pool)
    if cfg.get("drop_path") is not None:
        c["drop_path_rate"] = float(cfg["drop_path"])
    if c.get("use_shared_rel_pos_bias"):
        c["use_shared_rel_pos_bias"], c["use_rel_pos_bias"] = False, True
    return c


def swin_stage_maps(img_size: int, patch_size: int, stages: int) -> list[int]:
    grid = int(img_size) // int(patch_size)
    return [grid // 2 ** i for i in range(int(stages))]


def swin_window_fits(maps, window: int) -> bool:
    """Every stage map is a multiple of the window or not larger than it (then it is one window, no shift)."""
    return all(r <= window or r % window == 0 for r in maps)


def check_swin_window(img_size: int, patch_size: int, stages: int, window: int,
                      pretrained: tuple[int, int] | None = None) -> None:
    """ValueError naming the ``--window-size`` values that fit when ``window`` does not tile Swin's stage maps at
    ``img_size`` (``pretrained`` = the checkpoint's (image size, window), for the message)."""
    maps = swin_stage_maps(img_size, patch_size, stages)
    if maps[0] * int(patch_size) != int(img_size) or any(maps[0] % 2 ** i for i in range(int(stages))):
        return  # not a window problem: the model names the image size it needs
    if swin_window_fits(maps, int(window)):
        return
    fits = sorted((w for w in range(1, maps[0] + 1) if swin_window_fits(maps, w)),
                  key=lambda w: (abs(w - int(window)), -w))[:2]
    was = (f" (pre-trained at {pretrained[0]} px with window {pretrained[1]}; the tables are resampled to the new "
           f"window)") if pretrained else ""
    raise ValueError(f"Swin at --image-size {img_size} has stage maps {'/'.join(map(str, maps))} (patch "
                     f"{patch_size}), which {window}x{window} windows do not tile{was}: give --window-size "
                     f"{' or '.join(map(str, sorted(fits)))} (each map must be a multiple of the window or not larger "
                     f"than it; SimMIM fine-tunes its 192-px window-6 Swin at 224 px with --window-size 7), or "
                     f"another --image-size")


def finetune_swin_config(config: dict, cfg: dict) -> dict:
    """The fine-tuning Swin's config from the pre-trained one: the run's resolution, ``--window-size`` (default:
    the pre-trained window), drop path, no mask token, no classifier (the method's ``head``). ValueError with
    the windows that fit when the window does not tile the stage maps."""
    c = dict(config)
    c.update(img_size=int(cfg["image_size"]), use_mask_token=False, num_classes=0, global_pool="mean")
    if cfg.get("window_size") is not None:
        c["window_size"] = int(cfg["window_size"])
    if cfg.get("drop_path") is not None:
        c["drop_path_rate"] = float(cfg["drop_path"])
    check_swin_window(c["img_size"], int(c.get("patch_size", 4)), len(c.get("depths", (2, 2, 6, 2))),
                      int(c.get("window_size", 7)),
                      (config.get("img_size"), config.get("window_size")) if config.get("img_size") else None)
    return c


def default_pool(backbone: dict) -> str:
    method = backbone.get("source_method")
    config = backbone.get("config") or {}
    if method in MEAN_POOL_METHODS:
        return "mean"
    if method == "finetune":
        return config.get("global_pool", "mean")
    return config.get("global_pool", "cls") if config else "mean"


# ------------------------------------------------------------------------------------------------ layer ids
def vit_layer_id(name: str, num_layers: int) -> int:
    """unilm ``get_num_layer_for_vit`` (= SimMIM ``get_vit_layer``) for a backbone parameter name."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return num_layers - 1
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers - 1


_SPARK_RESNET_BLOCKS = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4), (30, 48): (5, 6)}


def resnet_layer_ids(layers) -> tuple[callable, int]:
    """``(name -> layer id, N)`` of SparK's ResNet layer decay (``N + 2`` ids, the head at ``N + 1``)."""
    L2, L3 = int(layers[1]), int(layers[2])
    blk2, blk3 = _SPARK_RESNET_BLOCKS.get((L2, L3), (max(1, math.ceil(L2 / 2)), max(1, math.ceil(L3 / 2))))
    N2, N3 = math.ceil(L2 / blk2 - 1e-5), math.ceil(L3 / blk3 - 1e-5)
    N = 2 + N2 + N3

    def layer_id(name: str) -> int:
        if name.startswith("layer"):
            stage, block = int(name.split(".")[0][5:]), int(name.split(".")[1])
            if stage == 1:
                return 1
            if stage == 2:
                return 2 + block // blk2
            if stage == 3:
                return 2 + N2 + block // blk3
            return N
        if name.startswith(("fc.", "head.")):
            return N + 1
        return 0

    return layer_id, N


def swin_layer_ids(depths) -> tuple[callable, int]:
    """``(name -> layer id, N)`` of SimMIM's Swin layer decay (``get_swin_layer``), ``N = sum(depths)``, ``N + 2``
    ids (the head at ``N + 1``), for this engine's (timm's) parameter names."""
    depths = [int(d) for d in depths]
    starts = [sum(depths[:s]) for s in range(len(depths))]
    N = sum(depths)

    def layer_id(name: str) -> int:
        if name == "mask_token" or name.startswith("patch_embed"):
            return 0
        if name.startswith("layers."):
            parts = name.split(".")
            stage = int(parts[1])
            if parts[2] == "downsample":  # the merging after stage - 1: SimMIM's layers.{stage-1}.downsample
                return starts[stage]
            if parts[2] == "blocks":
                return starts[stage] + int(parts[3]) + 1
        return N + 1

    return layer_id, N


def convnext_layer_ids(depths) -> tuple[callable, int]:
    N = 12 if int(depths[2]) > 9 else 6

    def layer_id(name: str) -> int:
        if name.startswith("downsample_layers"):
            stage = int(name.split(".")[1])
            return 0 if stage == 0 else (stage + 1 if stage in (1, 2) else N)
        if name.startswith("stages"):
            stage, block = int(name.split(".")[1]), int(name.split(".")[2])
            if stage in (0, 1):
                return stage + 1
            return 3 + block // 3 if stage == 2 else N
        return N + 1

    return layer_id, N


def adapt_swin_tables(state_dict: dict, target: dict) -> tuple[dict, list[str]]:
    """Swin's per-block relative position tables resampled (geometric, as SimMIM ``remap_pretrained_keys_swin``)
    where the fine-tuning window differs, and an absolute table (``ape``) resized bicubic (our extension; the
    official code has none to resize). Returns the new state dict and notes for the run's log."""
    from engine.models.pos_embed import resize_pos_embed, resize_rel_pos_table, window_of_table

    out, notes, moves = dict(state_dict), [], {}
    for key, t in target.items():
        src = out.get(key)
        if not key.endswith("relative_position_bias_table") or src is None or src.shape == t.shape \
                or src.ndim != 2 or src.shape[1] != t.shape[1]:
            continue  # a heads mismatch stays, for load_pretrained to name
        sw, dw = window_of_table(src.shape[0], with_cls=False), window_of_table(t.shape[0], with_cls=False)
        out[key] = resize_rel_pos_table(src, sw, dw, mode="geometric", with_cls=False)
        moves[f"{sw[0]} -> {dw[0]}"] = moves.get(f"{sw[0]} -> {dw[0]}", 0) + 1
    if moves:
        notes.append("relative position tables resampled (geometric) for the new windows: "
                     + ", ".join(f"window {k} ({n} blocks)" for k, n in moves.items()))
    key = "absolute_pos_embed"
    if key in out and key in target and out[key].shape != target[key].shape:
        side = int(round(math.sqrt(target[key].shape[1])))
        before = out[key].shape[1]
        out[key] = resize_pos_embed(out[key], (side, side), num_extra=0)
        notes.append(f"absolute position embedding resized (bicubic) from {before} to {side * side} patches")
    return out, notes


# ------------------------------------------------------------------------------------------------ the method
@register("finetune", pretraining=False)
class FineTune(PretrainMethod):
    # the BEiT ViT-B/16 ImageNet-1k recipe (unilm beit/get_started_for_image_classification.md); presets override
    defaults = dict(blr=1e-3, min_lr=1e-6, warmup_epochs=20.0, weight_decay=0.05, clip_grad=0.0, drop_path=0.1,
                    label_smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, reprob=0.25,
                    randaug="rand-m9-mstd0.5-inc1", hflip=0.5, crop_scale=(0.08, 1.0), loss="ce", eval_every=1,
                    best_metric="top1", final_knn=False)
    options = (
        Option("checkpoint", None, str, "finetune: pre-trained weights: an engine.pretrain output folder or checkpoint, "
                                        "or an engine.export .safetensors file"),
        Option("init", "pretrained", str, "finetune: 'pretrained' (the --checkpoint weights) or 'random' (from "
                                          "scratch)", choices=("pretrained", "random")),
        Option("compare_random", False, bool, "finetune: also fine-tune a randomly initialised copy, print both top-1"),
        Option("num_classes", None, int, "finetune: classes of the head (default: those of the train folder)",
               range=">=2"),
        Option("train_fraction", None, float, "finetune: fraction of every class of the train split used (few "
                                              "labels)", range="(0,1]"),
        Option("layer_decay", None, float, "finetune: layer-wise lr decay (layer l of L gets lr * decay^(L+1-l))",
               range="(0,1]"),
        Option("head_init_scale", None, float, "finetune: classifier init multiplied by this (BEiT's init_scale)",
               range="(0,inf)"),
        Option("label_smoothing", None, float, "finetune: label smoothing", range="[0,1)"),
        Option("mixup", None, float, "finetune: mixup alpha (0: off)", range="[0,inf)"),
        Option("cutmix", None, float, "finetune: cutmix alpha (0: off)", range="[0,inf)"),
        Option("mixup_prob", None, float, "finetune: probability that a batch is mixed", range="[0,1]"),
        Option("mixup_switch_prob", None, float, "finetune: probability of cutmix rather than mixup when both are on",
               range="[0,1]"),
        Option("randaug", None, str, "finetune: RandAugment as timm's string (rand-m9-mstd0.5-inc1) or 'none'"),
        Option("reprob", None, float, "finetune: random erasing probability", range="[0,1]"),
        Option("hflip", None, float, "finetune: horizontal flip probability", range="[0,1]"),
        Option("loss", None, str, "finetune: 'ce' (soft-target cross-entropy) or 'bce' (SparK's LAMB recipe)",
               choices=("ce", "bce")),
        Option("model_ema", False, bool, "finetune: also keep an fp32 EMA of the weights (BEiT's --model_ema), "
                                         "evaluated beside the model (top1_ema) and saved in the checkpoint"),
        Option("model_ema_decay", 0.9999, float, "finetune: EMA decay per optimizer step (BEiT: 0.9999 on ImageNet)",
               range="[0,1]"),
        Option("model_ema_warmup", False, bool, "finetune: cap the EMA decay at (1+n)/(10+n) after n steps (timm "
                                                "ModelEmaV3's warm-up)"),
    )

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        spec = cfg.get("backbone")
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
            raise ValueError(_RUN_BY)
        self.kind = spec["kind"]
        self.sync_batchnorm = self.kind in ("resnet", "convnext")  # SparK's downstream recipe: sbn=True under DDP
        self.num_classes = int(cfg.get("num_classes") or 0)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {cfg.get('num_classes')!r} (default: the train folder's)")
        self.smoothing = float(cfg.get("label_smoothing") or 0.0)
        loss = cfg.get("loss") or "ce"
        if loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss_fn = LOSSES[loss]
        config = spec.get("config")
        self.pool = cfg.get("pool") or default_pool(spec)
        if self.kind == "vit":
            if config:
                self.backbone = build_encoder("vit", finetune_vit_config(config, cfg, self.pool))
            else:
                self.backbone = backbone_from_cfg(cfg, use_mask_token=False, global_pool=self.pool,
                                                  use_shared_rel_pos_bias=False,
                                                  use_rel_pos_bias=bool(cfg.get("use_rel_pos_bias")
                                                                        or cfg.get("use_shared_rel_pos_bias")))
            dim = self.backbone.embed_dim
            if self.pool == "mean":  # BEiT's use_mean_pooling: no final norm, a new fc_norm after the pooling
                eps = float(self.backbone.config.get("norm_eps", 1e-6))
                self.backbone.norm = nn.Identity()
                self.fc_norm = nn.LayerNorm(dim, eps=eps)
            else:
                self.fc_norm = None
        elif self.kind == "swin":
            from engine.models.swin import swin_from_cfg

            if self.pool not in ("mean", "avg"):
                raise ValueError(f"--pool {self.pool}: Swin has no cls token; it is fine-tuned with mean pooling")
            self.pool = "mean"
            if config:
                self.backbone = build_encoder("swin", finetune_swin_config(config, cfg))
            else:  # --init random --model swin_*: the model's own window unless --window-size
                from engine.models.swin import SWIN_CONFIGS

                base = dict(SWIN_CONFIGS[str(cfg["model"])])
                patch = int(cfg.get("patch_size") or base.get("patch_size", 4))
                window = int(cfg.get("window_size") or base.get("window_size", 7))
                check_swin_window(int(cfg["image_size"]), patch, len(base["depths"]), window)
                self.backbone = swin_from_cfg(cfg, use_mask_token=False, num_classes=0)
            dim = self.backbone.num_features
            self.fc_norm = None  # SimMIM's Swin: the encoder's final norm, then the mean, then the head
        else:
            from engine.methods.spark import build_convnet

            dp = float(cfg.get("drop_path") or 0.0)
            if config:
                self.backbone = build_encoder(self.kind, config, drop_path_rate=dp)
            else:
                self.backbone = build_convnet(str(cfg["model"]), drop_path=dp)
            dim = self.backbone.num_features
            self.fc_norm = None
        self.head = nn.Linear(dim, self.num_classes)
        scale = cfg.get("head_init_scale")
        scale = float(scale) if scale is not None else (0.001 if self.kind == "vit" else 1.0)
        with torch.no_grad():
            if self.kind != "resnet":  # timm's ResNet keeps nn.Linear's default init for its fc
                nn.init.trunc_normal_(self.head.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(self.head.bias)
            self.head.weight.mul_(scale)
            self.head.bias.mul_(scale)
        layer_decay = cfg.get("layer_decay")
        self.layer_decay = float(layer_decay) if layer_decay is not None else DEFAULT_LAYER_DECAY[self.kind]

    # ---------------------------------------------------------------------------------- model
    def encoder(self) -> nn.Module:
        return self.backbone

    def features(self, images: torch.Tensor) -> torch.Tensor:
        f = self.backbone(images)
        return self.fc_norm(f) if self.fc_norm is not None else f

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def forward(self, batch: dict) -> dict:
        images, targets = mix_batch(batch["images"], batch["labels"], batch.get("mix"), self.num_classes,
                                    self.smoothing)
        return {"loss": self.loss_fn(self.classify(images), targets)}

    # ---------------------------------------------------------------------------------- loading
    def load_pretrained(self, state_dict: dict) -> list[str]:
        """Load the pre-trained encoder ``state_dict`` (this engine's names) into the backbone, adapting the
        position tables; raises ValueError naming what does not fit. Returns notes on what was done."""
        from engine.models.pos_embed import adapt_position_tables

        target = self.backbone.state_dict()
        sd = {k: v for k, v in state_dict.items() if not k.endswith(("relative_position_index", "flat_index"))}
        notes = []
        if self.kind == "vit":
            sd, notes = adapt_position_tables(sd, target)
        elif self.kind == "swin":
            sd, notes = adapt_swin_tables(sd, target)
        dropped = sorted(k for k in sd if k not in target)
        allowed = [k for k in dropped if k == "mask_token" or (self.fc_norm is not None and k.startswith("norm."))]
        bad = [k for k in dropped if k not in allowed]
        if bad:
            raise ValueError(f"the checkpoint's encoder has tensors this backbone does not: {', '.join(bad[:5])}"
                             + (" ..." if len(bad) > 5 else ""))
        missing = sorted(k for k in target if k not in sd)
        if missing:
            raise ValueError(f"the checkpoint's encoder lacks tensors of this backbone: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in target.items() if sd[k].shape != v.shape]
        if shapes:
            raise ValueError("the checkpoint's encoder does not fit this backbone: " + "; ".join(shapes[:3]))
        self.backbone.load_state_dict({k: sd[k] for k in target}, strict=True)
        if allowed:
            notes.append(f"not used: {', '.join(allowed)} (mean pooling replaces the final norm by a new fc_norm)"
                         if any(k.startswith("norm.") for k in allowed) else f"not used: {', '.join(allowed)}")
        return notes

    # ---------------------------------------------------------------------------------- optimiser groups
    def layer_ids(self) -> tuple[callable, int]:
        """``(backbone parameter name -> layer id, number of ids)``; the head and fc_norm take the last id."""
        if self.kind == "vit":
            n = int(self.backbone.depth) + 2
            return (lambda name: vit_layer_id(name, n)), n
        if self.kind == "swin":
            fn, N = swin_layer_ids(self.backbone.config["depths"])
        elif self.kind == "resnet":
            fn, N = resnet_layer_ids(self.backbone.config["layers"])
        else:
            fn, N = convnext_layer_ids(self.backbone.config["depths"])
        return fn, N + 2

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        if param.ndim <= 1 or name.endswith(".bias"):
            return True
        rest = name.split(".", 1)[1] if name.startswith("backbone.") else name
        if self.kind == "vit":
            return rest in VIT_NO_WD
        if self.kind == "swin":
            return any(k in rest for k in SWIN_NO_WD_KEYS)
        return any(k in name for k in CONV_NO_WD_KEYS)

    def optimizer_groups(self) -> list[dict]:
        layer_of, n = self.layer_ids()
        groups: dict[tuple[int, bool], dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("backbone."):
                lid = layer_of(name[len("backbone."):])
            else:
                lid = n - 1
            decay = not self.no_weight_decay(name, p)
            g = groups.setdefault((lid, decay), {"params": [], "names": [], "apply_wd": decay, "weight_decay": 0.0,
                                                 "lr_scale": self.layer_decay ** (n - 1 - lid), "layer_id": lid})
            g["params"].append(p)
            g["names"].append(name)
        return [groups[k] for k in sorted(groups)]


__all__ = ["ENCODER_PREFIX", "KINDS", "FineTune", "Source", "adapt_swin_tables", "build_encoder", "check_swin_window",
           "convnext_layer_ids", "default_pool", "finetune_swin_config", "finetune_vit_config", "kind_of",
           "load_source", "resnet_layer_ids", "swin_layer_ids", "vit_layer_id"]
