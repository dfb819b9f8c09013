"""``cdfsl backbones``: the registry, each entry's input size and whether its files are local.

"local" means the default weights, and the tokenizer files of families that need them (SigLIP,
SigLIP2), load without network access.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace
from open_clip.factory import LOCAL_DIR_PREFIX

NAME = "backbones"
HELP = "list registered backbones and whether their weights are available locally"


def configure(parser: ArgumentParser) -> None:
    """No arguments."""


def run(cfg: Namespace) -> None:
    import open_clip

    from cdfsl.backbones import list_backbones, weights_available

    entries = list_backbones()
    # Columns as wide as their longest value, so long family names (SigLIP2 SO400M) stay aligned.
    name_w = max(len("name"), *(len(e.name) for e in entries))
    model_w = max(len("open_clip model"), *(len(e.model) for e in entries))
    print(f"{'name':<{name_w}} {'open_clip model':<{model_w}} {'weights':<10} {'input':<8} local")
    for entry in entries:
        available = weights_available(entry)
        # A local-dir model's config lives in its folder, which may not exist yet.
        local_dir = entry.model.startswith(LOCAL_DIR_PREFIX)
        model_cfg = (
            open_clip.get_model_config(entry.model) if available or not local_dir else {}
        ) or {}
        size = model_cfg.get("vision_cfg", {}).get("image_size", "?")
        local = "yes" if available else "no"
        weights = entry.pretrained or "-"
        print(f"{entry.name:<{name_w}} {entry.model:<{model_w}} {weights:<10} {size!s:<8} {local}")
