"""Stand-ins for the published Lunit weight files, which cannot be downloaded here.

Each is built from the published module definition, written out independently
of wsi_embed's builder (Lunit's benchmark-ssl-pathology loader: torchvision
ResNet-50 with ``fc`` deleted; timm VisionTransformer(img_size=224, patch_size=P,
embed_dim=384, num_heads=6, num_classes=0)), seeded, and saved bare with
``torch.save(state_dict)``, as the real files are.
"""

from __future__ import annotations

from pathlib import Path

import torch

PUBLISHED_FILES = {
    "lunit-bt-rn50": "bt_rn50_ep200.torch",
    "lunit-mocov2-rn50": "mocov2_rn50_ep200.torch",
    "lunit-swav-rn50": "swav_rn50_ep200.torch",
    "lunit-dino-vits16": "dino_vit_small_patch16_ep200.torch",
    "lunit-dino-vits8": "dino_vit_small_patch8_ep200.torch",
}


def published_module(name: str) -> torch.nn.Module:
    if name.endswith("-rn50"):
        import torchvision

        model = torchvision.models.resnet50()
        del model.fc
        return model
    from timm.models.vision_transformer import VisionTransformer

    patch = {"lunit-dino-vits16": 16, "lunit-dino-vits8": 8}[name]
    return VisionTransformer(img_size=224, patch_size=patch, embed_dim=384, num_heads=6, num_classes=0)


def standin_state_dict(name: str, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = published_module(name)
        # Perturb BatchNorm running stats too (they start as exactly 0/1), so a test comparing
        # every tensor notices one that was not loaded; small changes keep the network alive
        # (large means would zero every ReLU and make all embeddings 0).
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.05 * torch.randn_like(buf))
            elif name.endswith("running_var"):
                buf.copy_(1.0 + 0.2 * torch.rand_like(buf))
        return model.state_dict()


def write_published_standins(checkpoint_dir: Path, names=None, seed: int = 1234) -> dict[str, Path]:
    """Write seeded stand-ins under their published file names; return name -> path."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate(names or PUBLISHED_FILES):
        path = checkpoint_dir / PUBLISHED_FILES[name]
        torch.save(standin_state_dict(name, seed + i), path)
        written[name] = path
    return written
