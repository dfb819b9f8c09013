"""The episode engine against this machine's limits, all figures measured in one run.

    python benchmarks/engine_speed.py                   # everything (ViT-B/16 bf16 is slow on
                                                        # CPUs without bf16 matrix units)
    python benchmarks/engine_speed.py --skip-vit        # micro-clip only
    python benchmarks/engine_speed.py --reference-steps 25 --episodes 1 4 8
    python benchmarks/engine_speed.py --skip-vit --loop-repeats 3   # steadier loop figures
    python benchmarks/engine_speed.py --skip-vit --shots 1 --loop-precisions fp32 bf16
    python benchmarks/engine_speed.py --skip-vit --compile inductor   # the compiled engine too

1. GEMM peak: a 1024² matmul per dtype, one thread; then attention forward + backward at
   micro-clip's and ViT-B/16's shapes through SDPA's flash and math backends and as three
   explicit ops (softmax(q kᵀ/√d) v).
2. A LoRA q/k/v training step (forward + backward to the adapters) for ViT-B/16 (random init,
   ``--vit-images`` images, 30 by default) and micro-clip (25 images = 5-way 1-shot, five
   views): FLOPs per image-step counted by ``torch.utils.flop_counter``, seconds per step,
   GFLOP/s and the fraction of each GEMM peak, for fp32 and bf16 autocast (frozen weights held
   in bf16, as the engine's fit holds them) and each ``--kernels`` attention setting.
3. Mind on micro-clip, 5-way 1-shot and 5-shot, five views: the reference loop as the public
   Mind code's entry point (``main.py`` -> ``lora_mind.run_lora_mind``) runs it, written here:
   one episode at a time, a deep copy of the model per episode, views drawn once per episode,
   the clean support forwarded a second time at every step (S, used or not), four interim query
   evaluations at T/5 .. 4T/5 besides the final one, a plain PyTorch loop, and the reference's
   LoRA layers (``loralib.PlainMultiheadAttentionLoRA``: separate q/k/v linears, a dropout per
   projection, the update as ``dropout(x) (B A)^T`` through the merged D x D product; merged
   into the weights for evaluation). The same loop on cdfsl's LoRA layers separates what the
   layers gain from what the engine's loop gains. Against both: cdfsl's engine
   (``EpisodicEvaluator.run_episodes``, E episodes side by side). Every loop runs
   ``--reference-steps`` steps; episodes per hour at the paper's T = 250·K are extrapolated
   from each loop's measured fixed cost and cost per step. ``--loop-precisions bf16`` runs
   every loop under bf16 autocast (the reference's fp16 autocast, on a CPU) with the frozen
   weights held in bf16 (its ``clip_model.half()``): the reference's layers on SDPA, cdfsl's
   on the kernel ``auto`` picks. ``--compile inductor`` adds the engine with its training
   forward compiled (``FitConfig.compile``); each engine's first fit (6 steps) is timed apart,
   the compile included (cold only with an empty ``TORCHINDUCTOR_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cdfsl.attention import (
    ATTENTION_KERNELS,
    AUTO,
    attention_kernel_in,
    resolve_attention_kernel,
)
from cdfsl.compiling import EAGER, STEP_COMPILERS, compiled_features_in
from cdfsl.data.episodes import EpisodeSampler, load_episode
from cdfsl.data.micro_world import MicroWorld
from cdfsl.data.views import DEFAULT_VIEWS, ViewAugmenter
from cdfsl.engine import FitConfig, episode_seed
from cdfsl.engine.fit import frozen_weights_in
from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator
from cdfsl.fewshot.losses import (
    fusion_target,
    mind_schedule,
    relation_alignment,
    suppressed_visual_cross_entropy,
    text_relation,
    visual_relation,
    vlm_cross_entropy,
)
from cdfsl.lora import LoRAConfig
from cdfsl.methods import LoRAFineTune, Mind

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def gemm_peaks(repeats: int) -> dict[str, float]:
    """GFLOP/s of a 1024² matmul per dtype: the best of ``repeats`` timings (a peak)."""
    peaks = {}
    for name, dtype in DTYPES.items():
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        best = min(seconds(lambda a=a, b=b: a @ b, 1) for _ in range(repeats))
        peaks[name] = 2 * 1024**3 / best / 1e9
    return peaks


def explicit_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v as three plain ops, for comparison with SDPA's kernels."""
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), -1) @ v


#: Attention paths compared: SDPA's flash and math backends and the explicit three ops.
ATTENTION = {
    "flash": lambda q, k, v: _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v),
    "math": lambda q, k, v: _sdpa(SDPBackend.MATH, q, k, v),
    "explicit": explicit_attention,
}


def _sdpa(backend: SDPBackend, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def attention_ms(path: str, shape: tuple[int, int, int, int], dtype: torch.dtype) -> float:
    """Forward + backward ms of one attention over (N, heads, L, d) q, k, v strided as the LoRA
    projection leaves them (one (N, L, 3, heads, d) block); the best of five."""
    n, heads, length, d = shape
    block = torch.randn(n, length, 3, heads, d, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = (t.detach().requires_grad_() for t in block.unbind(0))
    grad = torch.randn(shape, dtype=dtype)

    def step() -> None:
        ATTENTION[path](q, k, v).backward(grad)
        q.grad = k.grad = v.grad = None

    return 1e3 * min(seconds(step, 1) for _ in range(5))


def step_figures(
    backbone: str, images: int, precision: str, kernel: str, repeats: int, compiler: str = EAGER
) -> dict[str, float]:
    """FLOPs per image-step and seconds per LoRA training step, as the engine's fit runs it:
    under autocast the frozen weights held in the compute dtype, the LoRA attention on
    ``kernel``. The FLOPs are counted through SDPA whatever ``kernel``, so that every kernel is
    measured against the same work (the counter tallies an explicit attention's ops otherwise).
    ``compiler`` other than eager: the forward compiled as a fit compiles it, its first step (the
    compile) timed apart as ``compile_s``."""
    torch.manual_seed(0)
    method = LoRAFineTune(
        backbone=backbone, pretrained=None, class_names=[f"c{i}" for i in range(5)], views=None
    )
    method.train()
    method.on_train_start()
    x = torch.rand(images, 3, *method.backbone.preprocess.size)
    y = torch.arange(images) % 5
    dtype = DTYPES[precision]
    low = dtype != torch.float32
    cast = torch.autocast("cpu", dtype=dtype) if low else nullcontext()
    root = method.backbone.lora_root()

    encode = method.image_features

    def step() -> None:
        with cast:
            feats = encode(x)
        vlm_cross_entropy(feats, method.text_feats, y, method.scale).backward()

    with frozen_weights_in(root, dtype if low else None):
        counter = FlopCounterMode(display=False)
        with counter, attention_kernel_in(root, "sdpa"):
            step()
        flops = counter.get_total_flops()
        with attention_kernel_in(root, kernel), compiled_features_in(method, compiler, "cpu"):
            encode = method.step_features or method.image_features
            compile_s = seconds(step, 1, warmup=0) if compiler != EAGER else 0.0
            s_per_step = seconds(step, repeats)
        return {
            "gflop_per_image": flops / images / 1e9,
            "s_per_step": s_per_step,
            "flops": flops,
            "compile_s": compile_s,
        }


class ReferenceLoRAAttention(nn.Module):
    """The Mind reference's LoRA attention, re-implemented here to time it, not used by cdfsl.

    As ``loralib.layers.PlainMultiheadAttentionLoRA`` with ``enable_lora=['q', 'k', 'v']`` over
    a batch-first ``nn.MultiheadAttention``: the input transposed to ``(L, N, D)``, three separate
    frozen linears cut from ``in_proj_weight``, each adding ``dropout_i(x) @ (scale · B_i A_i)^T``
    (its own ``nn.Dropout``, the D x D product formed at every call); heads split by ``view``,
    ``F.scaled_dot_product_attention``, the frozen output projection. In eval mode the update is
    merged into the weight (the reference's ``add_lora_data``) and dropout is off.
    """

    def __init__(self, mha: nn.MultiheadAttention, lora: LoRAConfig) -> None:
        super().__init__()
        dim, self.heads = mha.embed_dim, mha.num_heads
        self.register_buffer("weight", mha.in_proj_weight.detach().clone().view(3, dim, dim))
        self.register_buffer("bias", mha.in_proj_bias.detach().clone().view(3, dim))
        self.out_proj = copy.deepcopy(mha.out_proj).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(3, lora.rank, dim))
        self.lora_B = nn.Parameter(torch.zeros(3, dim, lora.rank))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropouts = nn.ModuleList(nn.Dropout(lora.dropout) for _ in range(3))
        self.scale = lora.scale

    def forward(self, query: Tensor, *_: object, attn_mask: Tensor | None = None, **__: object):
        x = query.transpose(1, 0)
        length, batch, dim = x.shape
        heads = []
        for i in range(3):
            delta = self.lora_B[i] @ self.lora_A[i] * self.scale
            if self.training:
                y = F.linear(x, self.weight[i], self.bias[i])
                y = y + torch.matmul(self.dropouts[i](x), delta.transpose(0, 1))
            else:
                y = F.linear(x, self.weight[i] + delta, self.bias[i])
            y = y.view(length, batch * self.heads, -1).transpose(0, 1)
            heads.append(y.view(batch, self.heads, length, -1))
        out = F.scaled_dot_product_attention(*heads, attn_mask)
        out = out.permute(2, 0, 1, 3).contiguous().view(batch * length, dim)
        return self.out_proj(out).view(length, batch, dim).transpose(1, 0), None


def with_reference_layers(model: Mind, lora: LoRAConfig) -> Mind:
    """``model`` (built without LoRA) with every vision attention a ReferenceLoRAAttention."""
    for module in list(model.backbone.lora_root().modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, name, ReferenceLoRAAttention(child, lora))
    return model


def held_in(model: Mind, dtype: torch.dtype) -> Mind:
    """``model`` with its frozen vision weights held in ``dtype``, as the reference holds its
    model in fp16: the linear and convolution weights (cdfsl's cast) and the replica's q/k/v
    buffers; layer norms stay fp32 (the reference's are fp16 too)."""
    if dtype == torch.float32:
        return model
    root = model.backbone.lora_root()
    for module in root.modules():
        if isinstance(module, ReferenceLoRAAttention):
            module.weight, module.bias = module.weight.to(dtype), module.bias.to(dtype)
    frozen = frozen_weights_in(root, dtype)
    frozen.__enter__()
    _HELD.append(frozen)  # kept open for the process: a collected one would cast back
    return model


_HELD: list[object] = []


def reference_episode(
    model: Mind,
    dataset: MicroWorld,
    sampler: EpisodeSampler,
    index: int,
    steps: int,
    dtype: torch.dtype = torch.float32,
) -> float:
    """One episode as the public Mind code runs it; returns the final query accuracy.

    Under ``dtype`` bf16 the forwards run under bf16 autocast, as the reference's under fp16
    autocast (its GradScaler has nothing to do in bf16); ``model``'s frozen weights are then
    expected in bf16 already (the reference's ``clip_model.half()``, see :func:`held_in`).
    """
    model = copy.deepcopy(model)  # the reference copies the whole model per episode
    low = dtype != torch.float32
    cast = (lambda: torch.autocast("cpu", dtype=dtype)) if low else nullcontext
    torch.manual_seed(episode_seed(0, index))
    episode = load_episode(dataset, sampler.episode(index), model.to_tensor())
    model.set_classes(episode.class_names)
    text = model.text_feats
    augmenter = ViewAugmenter(DEFAULT_VIEWS)
    views, _ = augmenter(episode.support_images)  # drawn once per episode, reused every step
    labels = episode.support_labels.repeat(len(DEFAULT_VIEWS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 8 * steps, 1e-6)

    def accuracy() -> float:  # the reference's fsl_test: prompts encoded again, merged LoRA
        model.eval()
        with torch.no_grad(), cast():
            model.set_classes(episode.class_names)
            logits = model(episode.query_images)
        model.train()
        return float((logits.argmax(1) == episode.query_labels).float().mean())

    previous = None
    model.train()
    for k in range(steps):
        plan = mind_schedule(k, steps)
        with cast():
            feats = model.image_features(views)
            support = model.image_features(episode.support_images)  # S: every step, used or not
        loss = vlm_cross_entropy(feats, text, labels, model.scale)
        if plan.svl:
            loss = loss + 0.1 * suppressed_visual_cross_entropy(feats, labels, len(text), 100.0)
        relation = visual_relation(feats, support)
        if plan.ra:
            a_t = text_relation(text, labels, episode.support_labels)
            target = fusion_target(previous, a_t, plan.fusion_weight)
            loss = loss + 3.0 * relation_alignment(relation, target)
        previous = relation.detach()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        every = steps // 5  # the reference's save_freq = int(T / 5)
        if every and (k + 1) % every == 0 and (k + 1) // every <= 4:
            accuracy()  # the reference's interim evaluations at 1 .. 4 save_freq
    return accuracy()


def loop_costs(
    runs: dict[str, Callable[[int], None]], short: int, long: int, repeats: int = 1
) -> dict[str, tuple[float, float]]:
    """(fixed seconds, seconds per step) of each ``run(steps)`` from two step counts, timed
    ``repeats`` times, the loops in turn within each repeat, keeping each one's fastest (a busy
    moment slows a run, never speeds it; taking turns spreads a slow phase of a shared machine
    over every loop instead of one)."""
    times = {(name, steps): [] for name in runs for steps in (short, long)}
    for _ in range(repeats):
        for (name, steps), timed in times.items():
            timed.append(seconds(lambda run=runs[name], steps=steps: run(steps), 1, warmup=0))
    out = {}
    for name in runs:
        t_short, t_long = min(times[name, short]), min(times[name, long])
        per_step = (t_long - t_short) / (long - short)
        out[name] = (max(0.0, t_short - per_step * short), per_step)
    return out


#: The loops compared: the reference as its entry point runs it, the same loop on cdfsl's LoRA
#: layers, cdfsl's engine.
LOOPS = ("reference", "cdfsl_layers", "engine")


#: Lightning precision of the engine per loop precision.
LOOP_PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


def compare_loops(
    shot: int,
    steps: int,
    episodes: int,
    repeats: int = 1,
    precision: str = "fp32",
    compilers: tuple[str, ...] = (EAGER,),
) -> dict[str, float]:
    dataset = MicroWorld("chestx-like", images_per_class=40, seed=0)
    protocol = EpisodeProtocol(5, shot, 15, episodes, seed=0)
    sampler = EpisodeSampler(dataset.targets, 5, shot, 15, episodes, 0)
    lora = LoRAConfig(rank=16, alpha=8.0, dropout=0.25)
    torch.manual_seed(0)
    model = Mind(backbone="micro-clip", lora=lora, views=DEFAULT_VIEWS)
    layers = Mind(backbone="micro-clip", lora=lora, views=DEFAULT_VIEWS)
    plain = Mind(backbone="micro-clip", lora=None, views=DEFAULT_VIEWS).requires_grad_(False)
    dtype = DTYPES[precision]
    reference = held_in(with_reference_layers(plain, lora), dtype)
    layers = held_in(layers, dtype)

    def loop(template: Mind) -> Callable[[int], None]:
        def run(t: int) -> None:
            for index in range(episodes):
                reference_episode(template, dataset, sampler, index, t, dtype)

        return run

    def engine(compiler: str) -> Callable[[int], None]:
        def run(t: int) -> None:
            fit = FitConfig(
                steps=t,
                precision=LOOP_PRECISIONS[precision],
                accelerator="cpu",
                episodes_per_step=episodes,
                compile=compiler,
            )
            evaluator = EpisodicEvaluator(
                model, dataset, protocol, "/tmp/cdfsl-bench", fit, progress=False
            )
            evaluator.run_episodes(list(range(episodes)))

        return run

    out = {}
    # Each (K, E) compiles afresh (graphs from disk where cached): dynamo's recompile limit
    # would otherwise run later settings eagerly.
    torch._dynamo.reset()
    runs = {"reference": loop(reference), "cdfsl_layers": loop(layers)}
    for compiler in compilers:
        name = "engine" if compiler == EAGER else f"engine_{compiler}"
        runs[name] = engine(compiler)
        # Warm-up: first-call allocations, and the compile (both graphs: with and without S).
        out[f"{name}_warmup"] = seconds(lambda run=runs[name]: run(6), 1, warmup=0)
    # Both counts >= 5, so the reference's four interim evaluations fall in the fixed cost.
    for name, (fixed, per_step) in loop_costs(runs, 5, steps, repeats).items():
        out[f"{name}_fixed"] = fixed / episodes
        out[f"{name}_step"] = per_step / episodes
        out[f"{name}_eph"] = 3600 / ((fixed + per_step * 250 * shot) / episodes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--skip-loops", action="store_true", help="no reference-vs-engine part")
    parser.add_argument("--precisions", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--vit-repeats", type=int, default=1)
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=[AUTO, *ATTENTION_KERNELS],
        choices=[AUTO, *ATTENTION_KERNELS],
        help="LoRA attention kernel settings each step is timed with",
    )
    parser.add_argument(
        "--vit-images", type=int, default=30, help="images per ViT-B/16 step (1-shot, 5 views: 25)"
    )
    parser.add_argument(
        "--reference-steps", type=int, default=20, help="the longer step count (>= 10)"
    )
    parser.add_argument(
        "--episodes", type=int, nargs="+", default=[1, 4, 8], help="E values of the engine"
    )
    parser.add_argument(
        "--loop-repeats", type=int, default=1, help="times each loop is timed (the fastest kept)"
    )
    parser.add_argument(
        "--shots", type=int, nargs="+", default=[1, 5], help="K of the Mind loops compared"
    )
    parser.add_argument(
        "--compile",
        nargs="+",
        default=[EAGER],
        choices=list(STEP_COMPILERS),
        help="the training forward: each step and the engine timed eagerly and with each "
        "compiler given (inductor: torch.compile; the compile timed apart)",
    )
    parser.add_argument(
        "--loop-precisions",
        nargs="+",
        default=["fp32"],
        choices=list(LOOP_PRECISIONS),
        help="precisions of the Mind loops (bf16: every loop under bf16 autocast, frozen "
        "weights held in bf16; for CPUs with bf16 units)",
    )
    args = parser.parse_args()
    if args.loop_repeats < 1:
        parser.error(f"--loop-repeats {args.loop_repeats}: expected >= 1")
    if args.reference_steps < 10:
        parser.error(
            f"--reference-steps {args.reference_steps}: expected >= 10 (loops time 5 and N)"
        )
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    peaks = gemm_peaks(repeats=10)
    print("GEMM 1024² peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    # micro-clip at E = 8, 1-shot (240 images, 26 tokens) and ViT-B/16 at 30 images (197).
    for shape in ((240, 4, 26, 32), (30, 12, 197, 64)):
        for precision in args.precisions:
            ms = {p: attention_ms(p, shape, DTYPES[precision]) for p in ATTENTION}
            print(
                f"attention fwd+bwd {shape} {precision}: "
                + ", ".join(f"{p} {t:.1f} ms" for p, t in ms.items())
            )
    models = [("micro-clip", 25, 5)] + (
        [] if args.skip_vit else [("clip-vit-b16", args.vit_images, args.vit_repeats)]
    )
    gflop_per_image = {}
    compilers = tuple(dict.fromkeys([EAGER, *args.compile]))
    for backbone, images, repeats in models:
        step_s = {}
        for precision in args.precisions:
            for kernel, compiler in itertools.product(args.kernels, compilers):
                fig = step_figures(backbone, images, precision, kernel, repeats, compiler)
                gflop_per_image[backbone] = fig["gflop_per_image"]
                if compiler == EAGER:
                    step_s[precision, kernel] = fig["s_per_step"]
                rate = fig["flops"] / fig["s_per_step"] / 1e9
                ran = resolve_attention_kernel(kernel, "cpu", DTYPES[precision])
                compiled = (
                    ""
                    if compiler == EAGER
                    else f", {compiler} (first step {fig['compile_s']:.1f} s)"
                )
                print(
                    f"{backbone:<13} {images:>3} images {precision} attention {kernel} ({ran})"
                    f"{compiled}: {fig['gflop_per_image']:.3f} GFLOP/image-step, "
                    f"{fig['s_per_step']:.3f} s/step, {rate:.1f} GFLOP/s = "
                    f"{100 * rate / peaks['bf16']:.1f}% of bf16 peak, "
                    f"{100 * rate / peaks['fp32']:.1f}% of fp32 peak",
                    flush=True,
                )
        if {("fp32", AUTO), ("bf16", AUTO)} <= step_s.keys():
            print(
                f"{backbone} bf16 step (attention auto) vs fp32: "
                f"{step_s['fp32', AUTO] / step_s['bf16', AUTO]:.2f}x"
            )
    for precision, shot in itertools.product(args.loop_precisions, args.shots):
        if args.skip_loops:
            break
        # An episode-step forwards and back-propagates the five views and the separate clean
        # support: 6·5·K images; the floor is their FLOPs at the precision's GEMM peak.
        peak = peaks[precision]
        flops = 6 * 5 * shot * gflop_per_image.get("micro-clip", float("nan"))
        # The engine forwards S only on the steps whose terms read it and on the last one.
        t = 250 * shot
        with_s = sum(1 for k in range(t) if (p := mind_schedule(k, t)).svl or p.ra or k == t - 1)
        engine_images = 5 * 5 * shot + 5 * shot * with_s / t
        engine_flops = engine_images * gflop_per_image.get("micro-clip", float("nan"))
        for episodes in args.episodes:
            c = compare_loops(
                shot, args.reference_steps, episodes, args.loop_repeats, precision, compilers
            )
            loops = [name for name in (*LOOPS, *(f"engine_{n}" for n in args.compile)) if
                     f"{name}_step" in c]  # fmt: skip
            floor = 1e3 * flops / peak
            parts = [
                f"{name} {c[f'{name}_fixed']:.2f} s/episode fixed + "
                f"{1e3 * c[f'{name}_step']:.1f} ms/step "
                f"({100 * flops / c[f'{name}_step'] / peak:.0f}% of {precision} peak), "
                f"{c[f'{name}_eph']:.0f} episodes/hour at T={250 * shot}"
                for name in loops
            ]
            warmups = ", ".join(
                f"{name} {c[f'{name}_warmup']:.1f} s" for name in loops if f"{name}_warmup" in c
            )
            own = 100 * engine_flops / c["engine_step"] / peak
            print(
                f"Mind micro-clip 5-way {shot}-shot, 5 views, {precision}, E={episodes} (floor "
                f"{floor:.1f} ms/step): " + "; ".join(parts) + "; engine vs reference "
                f"{c['engine_eph'] / c['reference_eph']:.2f}x, vs the loop on cdfsl layers "
                f"{c['engine_eph'] / c['cdfsl_layers_eph']:.2f}x; the engine's own "
                f"{engine_images:.1f} images a step (S skipped after the RA phase) at {own:.0f}% "
                f"of {precision} peak; first fit of 6 steps (the compile included): {warmups}"
                + "".join(
                    f"; {name} vs reference {c[f'{name}_eph'] / c['reference_eph']:.2f}x"
                    for name in loops[len(LOOPS) :]
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
