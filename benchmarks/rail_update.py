"""RAIL update cost: seconds and peak memory per domain update, against H and block size.

    python benchmarks/rail_update.py                         # H and block sweeps, dual sweep
    python benchmarks/rail_update.py --hidden 2000 4000 8000 --samples 2048
    python benchmarks/rail_update.py --identity 15000        # float32 vs float64 at H=15000

One "domain update" is ``--samples`` unit-norm features of dimension ``--dim`` (clustered, as
image features of ``--classes`` classes are) fed to an adapter that has already learned one
domain of the same size. Times are wall-clock seconds on this machine and are printed with
their ratio to the first row of their sweep, so runs on different machines compare by ratios.
Memory is the resident high-water mark the update added (``cdfsl.memory.peak_rss``).

``--identity H`` measures how far the recursive float32 and float64 primal adapters are from
the joint ridge solution at that H. The reference is the push-through form
``W = Phi^T (Phi Phi^T + lambda I)^-1 Y`` solved in float64 (an N x N system, so no second
H x H matrix is needed), an independent derivation of the same solution.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from torch.nn import functional as F

from cdfsl.continual.rail import DualRegressor, PrimalRegressor
from cdfsl.memory import peak_rss


def clustered(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, dim)`` unit-norm float32 features around ``classes`` centres, and labels."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    noise = 0.8 * torch.randn(n, dim, generator=g) / dim**0.5
    return F.normalize(centres[labels] + noise, dim=1), labels


def timed_update(adapter, first, second) -> tuple[float, float]:
    """Learn domain one, then time domain two: (seconds, extra peak MB) of the second update."""
    adapter.update(*first)
    gc.collect()
    with peak_rss() as memory:
        start = time.perf_counter()
        adapter.update(*second)
        seconds = time.perf_counter() - start
    return seconds, memory["extra_mb"]


def domains(args: argparse.Namespace):
    (x1, y1), (x2, y2) = (clustered(args.samples, args.dim, args.classes, s) for s in (1, 2))
    c = args.classes
    return (x1, y1, c), (x2, y2 + c, 2 * c)  # the second domain brings new classes


def print_rows(title: str, key: str, rows: list[tuple[int, float, float]], expect) -> None:
    print(f"\n{title}")
    print(f"| {key} | seconds | ratio | expected ratio | extra peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|")
    base_value, base_seconds = rows[0][0], rows[0][1]
    for value, seconds, extra in rows:
        print(
            f"| {value} | {seconds:.3f} | {seconds / base_seconds:.2f} "
            f"| {expect(value, base_value)} | {extra:.0f} |"
        )


def sweep_hidden(args: argparse.Namespace) -> None:
    first, second = domains(args)
    rows = []
    for hidden in args.hidden:
        adapter = PrimalRegressor(args.dim, hidden, dtype=args.dtype, block_size=args.block)
        rows.append((hidden, *timed_update(adapter, first, second)))
        del adapter
        gc.collect()
    print_rows(
        f"Primal update vs H ({args.samples} samples, block {args.block}, {args.dtype}; "
        f"M alone is H² x {torch.finfo(getattr(torch, args.dtype)).bits // 8} bytes)",
        "H",
        rows,
        lambda h, h0: f"{(h / h0) ** 2:.2f} (H²)",
    )


def sweep_block(args: argparse.Namespace) -> None:
    first, second = domains(args)
    rows = []
    for block in args.blocks:
        adapter = PrimalRegressor(args.dim, args.block_hidden, dtype=args.dtype, block_size=block)
        rows.append((block, *timed_update(adapter, first, second)))
        del adapter
        gc.collect()
    print_rows(
        f"Primal update vs block size (H = {args.block_hidden}, {args.samples} samples, "
        f"{args.dtype}): same flops, BLAS efficiency and per-block overhead differ",
        "block",
        rows,
        lambda b, b0: "1.00 (flops)",
    )
    rows = []
    for block in args.blocks:
        adapter = DualRegressor(block_size=block)
        rows.append((block, *timed_update(adapter, first, second)))
    print_rows(
        f"Dual update vs block size ({args.samples} stored + {args.samples} new, float64)",
        "block",
        rows,
        lambda b, b0: "1.00 (flops)",
    )


def identity(args: argparse.Namespace) -> None:
    hidden = args.identity
    n = args.identity_samples
    x, y = clustered(n, args.dim, args.classes, 7)
    y = y % args.classes
    a32 = PrimalRegressor(args.dim, hidden, dtype=torch.float32, block_size=args.block)
    start = time.perf_counter()
    for lo in range(0, n, args.samples):  # domain-sized calls, streamed in blocks inside
        a32.update(x[lo : lo + args.samples], y[lo : lo + args.samples], args.classes)
    seconds32 = time.perf_counter() - start
    projection = a32.projection.double()
    w32 = a32.weights.double()
    del a32
    gc.collect()
    # Reference: push-through identity, float64, an N x N solve.
    phi = torch.relu(x.double() @ projection)
    kernel = phi @ phi.T
    kernel.diagonal().add_(0.1)
    joint = phi.T @ torch.linalg.solve(kernel, F.one_hot(y, args.classes).double())
    scores = phi @ joint
    results = [("float32", w32, seconds32)]
    del w32
    if not args.skip_float64:
        a64 = PrimalRegressor(args.dim, hidden, dtype=torch.float64, block_size=args.block)
        start = time.perf_counter()
        for lo in range(0, n, args.samples):
            a64.update(x[lo : lo + args.samples], y[lo : lo + args.samples], args.classes)
        results.append(("float64", a64.weights.clone(), time.perf_counter() - start))
        del a64
        gc.collect()
    print(
        f"\nRecursive primal vs joint ridge at H = {hidden}: {n} samples of dim {args.dim}, "
        f"{args.classes} classes, calls of {args.samples}, blocks of {args.block}"
    )
    print("| dtype | rel. Frobenius error of W | max abs score error | argmax agreement | s |")
    print("|---|---:|---:|---:|---:|")
    for name, weights, seconds in results:
        rel = float((weights - joint).norm() / joint.norm())
        got = phi @ weights
        err = float((got - scores).abs().max())
        agree = float((got.argmax(1) == scores.argmax(1)).double().mean())
        print(f"| {name} | {rel:.2e} | {err:.2e} | {100 * agree:.2f}% | {seconds:.1f} |")
    print(f"(scores of the joint solution span [{scores.min():.3f}, {scores.max():.3f}])")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512, help="feature dimension (ViT-B: 512)")
    parser.add_argument("--classes", type=int, default=100, help="classes per domain")
    parser.add_argument("--samples", type=int, default=1600, help="samples per domain update")
    parser.add_argument("--hidden", type=int, nargs="*", default=[1000, 2000, 4000, 8000])
    parser.add_argument("--block", type=int, default=1024, help="block size of the H sweep")
    parser.add_argument("--blocks", type=int, nargs="*", default=[16, 64, 256, 1024, 4096])
    parser.add_argument("--block_hidden", type=int, default=4000, help="H of the block sweep")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--identity", type=int, default=None, help="H of the identity check")
    parser.add_argument("--identity_samples", type=int, default=3200)
    parser.add_argument("--skip_float64", action="store_true", help="identity: float32 only")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.identity is not None:
        identity(args)
        return
    if args.hidden:
        sweep_hidden(args)
    if args.blocks:
        sweep_block(args)


if __name__ == "__main__":
    main()
