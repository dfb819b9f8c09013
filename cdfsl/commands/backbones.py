"""``cdfsl backbones``: the registry, each entry's input size and whether its weights are local."""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

NAME = "backbones"
HELP = "list registered backbones and whether their weights are available locally"


def configure(parser: ArgumentParser) -> None:
    """No arguments."""


def run(cfg: Namespace) -> None:
    import open_clip

    from cdfsl.backbones import list_backbones, weights_available

    print(f"{'name':<16} {'open_clip model':<20} {'weights':<10} {'input':<8} local")
    for entry in list_backbones():
        model_cfg = open_clip.get_model_config(entry.model) or {}
        size = model_cfg.get("vision_cfg", {}).get("image_size", "?")
        local = "yes" if weights_available(entry) else "no"
        print(
            f"{entry.name:<16} {entry.model:<20} {entry.pretrained or '-':<10} {size!s:<8} {local}"
        )
