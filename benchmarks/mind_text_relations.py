"""Is RA's text target a worse guide where Mind loses? A look at crop-like (issue 13, item 6).

RA pulls the visual relations A_v towards the text relations A_t
(``cdfsl.fewshot.losses.text_relation``). If A_t ranked class pairs differently from how the
images relate, RA would pull in a wrong direction. Per domain, from the zero-shot micro-clip on
held-out images (micro-world seed 1, not the benchmark's seed 0), this prints:

- the mean off-diagonal of A_t and of the visual prototype relations (``class_prototypes`` of
  every image of the class);
- their Spearman rank correlation over all class pairs: how well the text orders class pairs the
  way the images do;
- over the committed episodes of ``mind_fidelity.py`` (reference pair), the Pearson correlation
  between an episode's A_t–A_v agreement (its 5 classes) and its paired Mind − LoRAFineTune.

Reads the rows only; trains nothing, so it takes seconds.

    python benchmarks/mind_text_relations.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from mind_fidelity import _accuracy, _paired, _rows
from torch import Tensor

from cdfsl.backbones import Backbone, create_backbone
from cdfsl.data.micro_world import MicroWorld, list_domains
from cdfsl.features import encode_images
from cdfsl.fewshot.losses import class_prototypes
from cdfsl.plumbing import PROMPT_TEMPLATE

PAIR = ("mind/per_episode/separate", "ft/per_episode")


def off_diagonal(matrix: Tensor) -> np.ndarray:
    """The off-diagonal entries of a square ``(C, C)`` matrix, row-major."""
    return matrix[~torch.eye(len(matrix), dtype=torch.bool)].numpy()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two 1-d arrays without ties."""
    return float(np.corrcoef(a.argsort().argsort(), b.argsort().argsort())[0, 1])


@torch.no_grad()
def relations(backbone: Backbone, dataset: MicroWorld) -> tuple[Tensor, Tensor]:
    """``(A_t, A_v)``, each ``(C, C)``: text cosines and cosines of the class prototypes v_c."""
    text = backbone.text_features([PROMPT_TEMPLATE.format(c) for c in dataset.class_names])
    feats = encode_images(backbone, dataset, progress=False, geometry="resize_crop")
    protos = class_prototypes(feats, torch.tensor(dataset.targets), len(dataset.class_names))
    return text @ text.T, protos @ protos.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=Path, default=Path(__file__).parent / "results" / "mind-fidelity"
    )
    parser.add_argument("--images_per_class", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = create_backbone("micro-clip").eval()
    print("| domain | A_t off-diag | A_v off-diag | Spearman(A_t, A_v) | r(agreement, Mind − FT) |")
    print("|---|---|---|---|---|")
    for domain in [d for d in list_domains() if d != "source"]:
        dataset = MicroWorld(domain, images_per_class=args.images_per_class, seed=1)
        text_rel, visual_rel = relations(backbone, dataset)
        mind_rows = _rows(args.rows, domain, PAIR[0])
        gain = _paired(_accuracy(mind_rows), _accuracy(_rows(args.rows, domain, PAIR[1])))
        index = {name: i for i, name in enumerate(dataset.class_names)}
        agreement = []
        for episode in gain:
            ids = torch.tensor([index[c] for c in mind_rows[episode]["classes"]])
            sub = (off_diagonal(m[ids][:, ids]) for m in (text_rel, visual_rel))
            agreement.append(np.corrcoef(*sub)[0, 1])
        r = np.corrcoef(agreement, list(gain.values()))[0, 1] if len(gain) > 2 else float("nan")
        text_pairs, visual_pairs = off_diagonal(text_rel), off_diagonal(visual_rel)
        print(
            f"| {domain} | {text_pairs.mean():.3f} | {visual_pairs.mean():.3f} "
            f"| {spearman(text_pairs, visual_pairs):+.2f} "
            f"| {r:+.2f} (n = {len(gain)}) |"
        )


if __name__ == "__main__":
    main()
