"""Writes tests/data/timm_layer_decay.json: timm's layer-wise decay groups.

For one model of each family timm decays (ViT, ViT with registers, DeiT
distilled, BEiT, EVA-02, Swin, ConvNeXt), built without weights, it records
every parameter's name and shape, the layer id timm's
``param_groups_layer_decay`` gives it (``group_parameters`` over the model's
``group_matcher``, unmatched names at the last layer), the number of layers,
and the ``lr_scale`` that ``create_optimizer_v2(model, "adamw",
layer_decay=0.75)`` puts in its parameter groups, to check the ids. Needs
torch and timm (not layerwise):

  python tests/make_timm_fixture.py tests/data/timm_layer_decay.json
"""

import json
import sys

import timm
import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

MODELS = {
    "vit": "vit_tiny_patch16_224",
    "vit_registers": "vit_small_patch14_reg4_dinov2",
    "deit_distilled": "deit_tiny_distilled_patch16_224",
    "beit": "beit_base_patch16_224",
    "eva02": "eva02_tiny_patch14_224",
    "swin": "swin_tiny_patch4_window7_224",
    "convnext": "convnext_atto",
}
DECAY = 0.75


def record(model_name):
  # A fine-tuning head of 10 classes (dinov2 models have none by default).
  model = timm.create_model(model_name, pretrained=False, num_classes=10)
  layer_map = group_parameters(model, model.group_matcher(coarse=False),
                               reverse=True)
  num_layers = max(layer_map.values()) + 1
  scale_of = {}
  optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=DECAY)
  by_id = {id(p): n for n, p in model.named_parameters()}
  for group in optimizer.param_groups:
    for p in group["params"]:
      scale_of[by_id[id(p)]] = group["lr_scale"]
  params = []
  for name, p in model.named_parameters():
    layer = layer_map.get(name, num_layers - 1)
    assert abs(scale_of[name] - DECAY ** (num_layers - 1 - layer)) < 1e-12
    params.append([name, list(p.shape), layer, scale_of[name]])
  return {"model": model_name, "num_layers": num_layers, "params": params}


def main(path):
  out = {"timm": timm.__version__, "torch": torch.__version__,
         "decay": DECAY,
         "families": {family: record(name) for family, name in MODELS.items()}}
  with open(path, "w") as f:
    json.dump(out, f, separators=(",", ":"))
  for family, data in out["families"].items():
    print(f"{family:<16} {data['model']:<34} {len(data['params']):>4} "
          f"params, {data['num_layers']} layers")


if __name__ == "__main__":
  main(sys.argv[1])
