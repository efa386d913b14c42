"""UNet/backbone latency: SnapGen UNet vs SDXL UNet vs SD3-Medium MMDiT, measured in the same run.

    python bench/unet_latency.py [--device auto|cpu|cuda] [--resolution 256|1024] [--batches 1,4,8]
                                 [--models snapgen,sdxl,sd3m] [--compile] [--cuda-graphs]
                                 [--out bench/RESULTS.md] [--quick]

For each backbone: parameters, FLOPs per forward (torch.utils.flop_counter.FlopCounterMode:
matmuls, convolutions, SDPA; element-wise ops are not counted), forward latency at batch 1
(median of timed runs after warm-up, under torch.no_grad, GPU synchronised), throughput (images/s)
at the larger batches and achieved TFLOP/s. Variants: eager always; on a GPU by default (on a CPU
only when asked) torch.compile, CUDA-graph replay of the eager model and of the compiled model.
GPU runs use bf16 weights (autocast added only for a model whose forward mixes dtypes), TF32 for
fp32, and channels_last for the conv UNets when a quick probe shows it is faster.

Models are built with random weights from hard-coded configs; nothing is downloaded:
- SnapGen: `snapgen_model` preset snapgen-1024 with image_size set to --resolution.
- SDXL: diffusers UNet2DConditionModel with stabilityai/stable-diffusion-xl-base-1.0's
  unet/config.json (2.57B parameters), 4 latent channels.
- SD3-Medium: diffusers SD3Transformer2DModel with stabilityai/stable-diffusion-3-medium-diffusers'
  transformer/config.json (2.03B parameters), 16 latent channels.

The section `## UNet latency (bench/unet_latency.py)` of --out is written (or replaced).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Timing,
    TimingPolicy,
    assert_finite_params,
    command_line,
    device_name,
    environment_line,
    fast_random_init,
    fmt_num,
    free_memory,
    load_average,
    load_warning,
    markdown_table,
    now_utc,
    print_table,
    replace_section,
    resolve_device,
    synchronize,
    time_callable,
)

SECTION = "## UNet latency (bench/unet_latency.py)"

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers 0.19 era; keys unchanged since)
SDXL_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text + 6 time ids x 256
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
SD3_MEDIUM_CONFIG: dict = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}

# spec context (SNAPGEN_SPEC.md / task brief): GPU target and reference figures on an H200
GPU_TARGET_MS = 6.0
REFERENCE_H200 = ("reference on an H200 at 1024^2, batch 1: SDXL UNet ~54 ms eager, SD3-Medium ~33 ms, "
                  "a straightforward SnapGen UNet ~30 ms eager / 8.4 ms with CUDA graphs, "
                  "1.47 TFLOP per SnapGen forward")
CONTENDED_SHARE = 0.85  # CPU share below this flags a measurement as contended (and re-times it)
RETRY_PAUSE_S = 15.0
VARIANTS = ("eager", "cuda-graph", "compile", "compile+cuda-graph")


# ----------------------------------------------------------------------------------------------
# models


@dataclass
class ModelSpec:
    key: str
    label: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, torch.device, torch.dtype], tuple[tuple, dict]]
    conv_net: bool  # channels_last is worth trying
    describe: str  # input shapes, for the report


def snapgen_spec(resolution: int, preset: str) -> ModelSpec:
    from snapgen_model.inspect import example_inputs
    from snapgen_model.nn.unet import SnapGenUNet
    from snapgen_model.presets import get_preset

    cfg = get_preset(preset, [f"image_size={resolution}"])
    u, n = cfg.unet, cfg.latent_size
    tokens = 77

    def inputs(b: int, device: torch.device, dtype: torch.dtype):
        torch.manual_seed(0)
        x, t, cond = example_inputs(cfg, b, text_tokens=tokens, device=device)
        cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
        return (x.to(dtype), t), cond

    desc = (f"x (B,{u.in_channels},{n},{n}), t (B,) in [0,1], context (B,{tokens},{u.context_dim}), "
            f"pooled (B,{u.pooled_dim})" if u.conditioning == "text" else
            f"x (B,{u.in_channels},{n},{n}), t (B,), labels (B,)")
    return ModelSpec("snapgen", f"SnapGen UNet ({preset})" if preset != "snapgen-1024" else "SnapGen UNet", lambda: SnapGenUNet(u), inputs, True, desc)


def sdxl_spec(resolution: int) -> ModelSpec:
    from diffusers import UNet2DConditionModel

    n, tokens = resolution // 8, 77

    def inputs(b: int, device: torch.device, dtype: torch.dtype):
        torch.manual_seed(0)
        kw = dict(
            encoder_hidden_states=torch.randn(b, tokens, 2048, device=device, dtype=dtype),
            added_cond_kwargs=dict(
                text_embeds=torch.randn(b, 1280, device=device, dtype=dtype),
                time_ids=torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * b,
                                      device=device, dtype=dtype)),
            return_dict=False,
        )
        return (torch.randn(b, 4, n, n, device=device, dtype=dtype),
                torch.full((b,), 500.0, device=device)), kw

    desc = (f"sample (B,4,{n},{n}), timestep (B,), encoder_hidden_states (B,{tokens},2048), "
            f"text_embeds (B,1280), time_ids (B,6)")
    return ModelSpec("sdxl", "SDXL UNet",
                     lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG), inputs, True, desc)


def sd3m_spec(resolution: int, tokens: int) -> ModelSpec:
    from diffusers import SD3Transformer2DModel

    n = resolution // 8

    def inputs(b: int, device: torch.device, dtype: torch.dtype):
        torch.manual_seed(0)
        kw = dict(
            encoder_hidden_states=torch.randn(b, tokens, 4096, device=device, dtype=dtype),
            pooled_projections=torch.randn(b, 2048, device=device, dtype=dtype),
            timestep=torch.full((b,), 500.0, device=device),
            return_dict=False,
        )
        return (torch.randn(b, 16, n, n, device=device, dtype=dtype),), kw

    desc = (f"hidden_states (B,16,{n},{n}) = {(n // 2) ** 2} patch tokens, encoder_hidden_states "
            f"(B,{tokens},4096) ({'77 CLIP + 77 T5' if tokens == 154 else '77 CLIP + 256 T5'}), "
            f"pooled (B,2048), timestep (B,)")
    return ModelSpec("sd3m", "SD3-Medium", lambda: SD3Transformer2DModel(**SD3_MEDIUM_CONFIG),
                     inputs, False, desc)


# ----------------------------------------------------------------------------------------------
# measurement


@dataclass
class VariantResult:
    variant: str
    timings: dict[int, Timing] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    setup_s: float = 0.0  # compile / capture time spent outside the timed runs


@dataclass
class ModelResult:
    spec: ModelSpec
    params: int = 0
    flops_per_image: float = math.nan  # FLOPs of one batch-1 forward
    precision: str = "fp32"
    autocast: bool = False
    channels_last: bool = False
    build_s: float = 0.0
    peak_gib: float | None = None
    finite: bool = True
    flops_1024: float | None = None  # batch-1 FLOPs at 1024^2, counted on the meta device
    variants: list[VariantResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def first_tensor(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def to_channels_last(args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a
                 for a in args)


class Runner:
    """Callables for one model: eager / compiled, optionally replayed from a captured CUDA graph."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, spec: ModelSpec,
                 autocast: bool, channels_last: bool) -> None:
        self.model, self.device, self.dtype, self.spec = model, device, dtype, spec
        self.autocast, self.channels_last = autocast, channels_last
        self.compiled: torch.nn.Module | None = None
        self.reduce_overhead: torch.nn.Module | None = None
        self.notes: list[str] = []

    def ctx(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.autocast:
            # cache_enabled=False: the autocast weight cache does not mix with CUDA-graph capture
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False))
        return stack

    def inputs(self, batch: int) -> tuple[tuple, dict]:
        args, kwargs = self.spec.inputs(batch, self.device, self.dtype)
        return (to_channels_last(args) if self.channels_last else args), kwargs

    def call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Callable[[], object]:
        def fn():
            with self.ctx():
                return module(*args, **kwargs)
        return fn

    def make(self, variant: str, batch: int, compile_mode: str) -> tuple[Callable[[], object], list]:
        """(callable, objects to keep alive) for a variant at a batch size."""
        args, kwargs = self.inputs(batch)
        module = self.model
        if variant.startswith("compile"):
            if self.compiled is None:
                self.compiled = torch.compile(self.model, mode=compile_mode, dynamic=False)
            module = self.compiled
        fn = self.call(module, args, kwargs)
        keep: list = [args, kwargs]
        if not variant.endswith("cuda-graph"):
            return fn, keep
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        try:
            return self._capture(fn, keep)
        except Exception as exc:  # noqa: BLE001
            if variant != "compile+cuda-graph":
                raise
            # fall back to inductor's own CUDA graphs (cudagraph trees)
            self.notes.append(f"{variant} bs{batch}: manual capture of the compiled model failed "
                              f"({type(exc).__name__}); used torch.compile(mode='reduce-overhead')")
            torch.cuda.synchronize(self.device)
            if self.reduce_overhead is None:
                self.reduce_overhead = torch.compile(self.model, mode="reduce-overhead", dynamic=False)
            inner = self.call(self.reduce_overhead, args, kwargs)

            def step():
                torch.compiler.cudagraph_mark_step_begin()
                return inner()

            for _ in range(3):  # compile, record, then replay
                step()
            return step, keep

    def _capture(self, fn: Callable[[], object], keep: list) -> tuple[Callable[[], object], list]:
        """Warm fn up on a side stream, capture one call into a CUDA graph; replay() re-runs it."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile + autotune + cudnn benchmark + allocator warm-up off the capture
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()  # static output buffers, overwritten by every replay
        keep += [graph, out]
        return graph.replay, keep


def policy_for(device: torch.device, quick: bool, batch: int, variant: str, first: bool) -> TimingPolicy:
    if device.type == "cuda":
        warm = 5 if variant == "eager" else 3  # compile variants compiled once already in make()
        return TimingPolicy(warmup=warm, min_runs=5 if quick else 20, max_runs=100 if quick else 500,
                            budget_s=0.5 if quick else 3.0)
    # CPU: the FLOP-count forward is the warm-up of the first timed batch
    if quick:
        # big batches are timed once or twice without warm-up (seconds per forward; the first-call
        # overhead is small beside that)
        return TimingPolicy(warmup=0 if first else 1 if batch == 1 else 0, min_runs=3 if batch == 1 else 1,
                            max_runs=5, budget_s=8.0)
    return TimingPolicy(warmup=1, min_runs=3 if batch == 1 else 2, max_runs=10, budget_s=20.0)


def count_flops(fn: Callable[[], object]) -> tuple[float, object]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def meta_flops(args: argparse.Namespace, key: str, resolution: int = 1024) -> float | None:
    """Batch-1 FLOPs of the model at another resolution, counted on the meta device (no memory, ~1 s)."""
    spec = {"snapgen": lambda: snapgen_spec(resolution, args.snapgen_preset),
            "sdxl": lambda: sdxl_spec(resolution), "sd3m": lambda: sd3m_spec(resolution, args.sd3_tokens)}[key]()
    meta = torch.device("meta")
    try:
        with meta:
            model = spec.build()
            a, k = spec.inputs(1, meta, torch.float32)
            flops, _ = count_flops(lambda: model(*a, **k))
        return flops
    except Exception as exc:  # noqa: BLE001 - context only
        print(f"[{key}] meta-device FLOP count at {resolution}^2 failed: {exc}", flush=True)
        return None


def benchmark_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device,
                    variants: list[str]) -> ModelResult:
    res = ModelResult(spec)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    res.precision = "bf16" if dtype == torch.bfloat16 else ("fp32 (TF32)" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.resolution != 1024:
        res.flops_1024 = meta_flops(args, spec.key)
    t0 = time.perf_counter()
    on_cpu = device.type == "cpu"
    with fast_random_init(seed=0, enabled=on_cpu and not args.exact_init), torch.device(device):
        model = spec.build()
    model = model.to(device=device).eval().requires_grad_(False)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    assert_finite_params(model, spec.label)
    res.build_s = time.perf_counter() - t0
    res.params = sum(p.numel() for p in model.parameters())
    print(f"[{spec.key}] built {res.params / 1e6:,.1f}M params in {res.build_s:.1f} s", flush=True)

    runner = Runner(model, device, dtype, spec, autocast=False, channels_last=False)
    # the FLOP-count forward at the first batch doubles as its warm-up; a bf16 forward that trips on
    # mixed dtypes (e.g. an fp32 time embedding into a bf16 Linear) falls back to bf16 autocast
    fb = args.batches[0]
    a1, k1 = runner.inputs(fb)
    t0 = time.perf_counter()
    try:
        flops, out = count_flops(runner.call(model, a1, k1))
    except RuntimeError as exc:
        if dtype != torch.bfloat16 or "type" not in str(exc).lower():  # "dtype", "scalar type"
            raise
        runner.autocast = res.autocast = True
        res.notes.append(f"pure bf16 forward failed ({str(exc).splitlines()[0][:80]}); ran under bf16 autocast")
        flops, out = count_flops(runner.call(model, a1, k1))
    synchronize(device)
    print(f"[{spec.key}] FLOP-count forward (bs{fb}): {flops / fb / 1e9:,.1f} GFLOP/img, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    res.flops_per_image = flops / fb
    res.finite = bool(torch.isfinite(first_tensor(out).float()).all())
    if not res.finite:
        res.notes.append("output has non-finite values (random weights)")
    del out

    # channels_last where it pays: probed on eager at the latency batch for the conv UNets
    cl = args.channels_last
    if cl == "on" or (cl == "auto" and device.type == "cuda" and spec.conv_net):
        if cl == "on":
            runner.channels_last = True
            model.to(memory_format=torch.channels_last)
        else:
            probe = TimingPolicy(warmup=3, min_runs=10, max_runs=50, budget_s=0.5)
            fn, _ = runner.make("eager", fb, args.compile_mode)
            base = time_callable(fn, device, probe).median_s
            model.to(memory_format=torch.channels_last)
            runner.channels_last = True
            fn, _ = runner.make("eager", fb, args.compile_mode)
            cl_s = time_callable(fn, device, probe).median_s
            if cl_s >= base:
                model.to(memory_format=torch.contiguous_format)
                runner.channels_last = False
            res.notes.append(f"channels_last probe (eager bs{fb}): {base * 1e3:.2f} ms contiguous vs "
                             f"{cl_s * 1e3:.2f} ms channels_last -> {'on' if runner.channels_last else 'off'}")
    res.channels_last = runner.channels_last

    first = True
    for variant in variants:
        vr = VariantResult(variant)
        res.variants.append(vr)
        batches = args.batches if variant == "eager" or args.graph_batches is None else \
            [b for b in args.batches if b in args.graph_batches]
        for b in batches:
            keep: list = []
            try:
                t0 = time.perf_counter()
                fn, keep = runner.make(variant, b, args.compile_mode)
                if variant != "eager" and not variant.endswith("cuda-graph"):
                    fn()  # compile for this shape outside the timed runs
                synchronize(device)
                vr.setup_s += time.perf_counter() - t0
                pol = policy_for(device, args.quick, b, variant, first and variant == "eager")
                first = False
                tm = time_callable(fn, device, pol)
                for attempt in range(args.retries if device.type == "cpu" else 0):
                    if tm.cpu_share >= CONTENDED_SHARE:
                        break
                    print(f"[{spec.key}] {variant} bs{b}: CPU share {tm.cpu_share:.0%} (other processes on "
                          f"the CPU); re-timing ({attempt + 1}/{args.retries}) after {RETRY_PAUSE_S:g} s",
                          flush=True)
                    time.sleep(RETRY_PAUSE_S)
                    again = time_callable(fn, device, TimingPolicy(0, pol.min_runs, pol.max_runs, pol.budget_s))
                    tm = again if again.cpu_share > tm.cpu_share else tm
                vr.timings[b] = tm
                print(f"[{spec.key}] {variant:>18} bs{b}: median {tm.median_s * 1e3:,.1f} ms over "
                      f"{len(tm.times_s)} runs (min {tm.min_s * 1e3:,.1f}, max {max(tm.times_s) * 1e3:,.1f}; "
                      f"{b / tm.median_s:,.2f} img/s" + (f"; CPU share {tm.cpu_share:.0%})" if device.type == "cpu"
                                                         else ")"), flush=True)
            except Exception as exc:  # noqa: BLE001 - one failing variant must not end the benchmark
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
                vr.errors[b] = msg
                print(f"[{spec.key}] {variant} bs{b} FAILED: {msg}", flush=True)
                if args.verbose:
                    traceback.print_exc()
            finally:
                fn = keep = None  # noqa: F841 - drop captured graphs and their memory pools before the next batch
                free_memory(device)
    res.notes += runner.notes
    if device.type == "cuda":
        res.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    del runner, model
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    free_memory(device)
    return res


# ----------------------------------------------------------------------------------------------
# report


def cpu_share(vr: VariantResult) -> float:
    """CPU time / (wall x threads) over all timed runs of a variant (1.0 = CPU to ourselves)."""
    wall = sum(sum(t.times_s) for t in vr.timings.values())
    cpu = sum(sum(t.cpu_s) for t in vr.timings.values())
    return cpu / (wall * torch.get_num_threads()) if wall else math.nan


def build_rows(results: list[ModelResult], batches: list[int], device: torch.device) -> tuple[list[str], list[list[str]]]:
    lat_b = batches[0]
    thr_bs = batches[1:]
    snap = next((r for r in results if r.spec.key == "snapgen" and not r.error), None)
    headers = ["model", "variant", "precision", "params (M)", "GFLOP/img", f"bs{lat_b} latency ms (n)"]
    headers += [f"bs{b} img/s" for b in thr_bs]
    headers += [f"TFLOP/s @bs{lat_b}", "TFLOP/s best"]
    if snap is not None:
        headers += ["FLOPs / SnapGen", "latency / SnapGen"]
    if device.type == "cuda":
        headers += ["peak GiB"]
    else:
        headers += ["CPU share"]
    rows = []
    for r in results:
        if r.error:
            rows.append([r.spec.label, "-", r.precision, "-", "-", f"failed: {r.error}"] + ["-"] * (len(headers) - 6))
            continue
        for vr in r.variants:
            row = [r.spec.label, vr.variant + (" +CL" if r.channels_last else ""),
                   r.precision + (" autocast" if r.autocast else ""), fmt_num(r.params / 1e6, 4),
                   fmt_num(r.flops_per_image / 1e9, 4)]
            tl = vr.timings.get(lat_b)
            row.append(f"{fmt_num(tl.median_s * 1e3, 4)} ({len(tl.times_s)})" if tl else
                       ("failed" if lat_b in vr.errors else "-"))
            best = 0.0
            for b in batches:
                tb = vr.timings.get(b)
                if tb:
                    best = max(best, r.flops_per_image * b / tb.median_s / 1e12)
            for b in thr_bs:
                tb = vr.timings.get(b)
                row.append(fmt_num(b / tb.median_s, 3) if tb else ("failed" if b in vr.errors else "-"))
            row.append(fmt_num(r.flops_per_image / tl.median_s / 1e12, 3) if tl else "-")
            row.append(fmt_num(best, 3) if best else "-")
            if snap is not None:
                row.append(fmt_num(r.flops_per_image / snap.flops_per_image, 3))
                sv = next((v for v in snap.variants if v.variant == vr.variant), None)
                st = sv.timings.get(lat_b) if sv else None
                row.append(fmt_num(tl.median_s / st.median_s, 3) if tl and st else "-")
            if device.type == "cuda":
                row.append(fmt_num(r.peak_gib, 3))
            else:
                share = cpu_share(vr)
                row.append(f"{share:.0%}" if not math.isnan(share) else "-")
            rows.append(row)
    return headers, rows


def summary_lines(results: list[ModelResult], args: argparse.Namespace, device: torch.device) -> list[str]:
    lines = []
    ok = {r.spec.key: r for r in results if not r.error}
    lat_b = args.batches[0]

    def eager_ms(r: ModelResult) -> float | None:
        t = r.variants[0].timings.get(lat_b) if r.variants else None
        return t.median_s * 1e3 if t else None

    if "snapgen" in ok:
        s = ok["snapgen"]
        for key in ("sdxl", "sd3m"):
            if key in ok:
                o = ok[key]
                lat = (f"; eager latency (bs{lat_b}) {fmt_num(eager_ms(o))} ms vs {fmt_num(eager_ms(s))} ms = "
                       f"{fmt_num(eager_ms(o) / eager_ms(s))}x" if eager_ms(o) and eager_ms(s) else "")
                lines.append(f"- {o.spec.label} vs SnapGen: params {fmt_num(o.params / s.params)}x, FLOPs "
                             f"{fmt_num(o.flops_per_image / s.flops_per_image)}x{lat}")
        if device.type == "cuda":
            best = min((v.timings[1].median_s * 1e3, v.variant) for v in s.variants if 1 in v.timings) \
                if any(1 in v.timings for v in s.variants) else None
            if best and args.resolution == 1024 and args.precision == "bf16":
                verdict = "MEETS" if best[0] <= GPU_TARGET_MS else "MISSES"
                lines.append(f"- SnapGen best batch-1 latency {best[0]:.2f} ms ({best[1]}) {verdict} the "
                             f"<= {GPU_TARGET_MS:g} ms target")
            elif best:
                lines.append(f"- SnapGen best batch-1 latency {best[0]:.2f} ms ({best[1]}); the <= "
                             f"{GPU_TARGET_MS:g} ms target is defined at 1024^2 bf16 only")
    at_1024 = [f"{r.spec.label} {r.flops_1024 / 1e12:.2f}" for r in results if r.flops_1024]
    if at_1024:
        lines.append(f"- FLOPs per batch-1 forward at 1024^2 (meta-device count, TFLOP): {', '.join(at_1024)} "
                     f"(spec reference for SnapGen: 1.47)")
    for r in results:
        if r.error:
            lines.append(f"- {r.spec.label}: FAILED ({r.error})")
        for vr in r.variants:
            for b, e in vr.errors.items():
                lines.append(f"- {r.spec.label} {vr.variant} bs{b}: failed ({e})")
    return lines


def section_body(results, headers, rows, args, device, runtime_s: float) -> str:
    res, n = args.resolution, args.resolution // 8
    lat_b = args.batches[0]
    out = [
        f"Measured {now_utc()} with `{command_line()}` "
        f"(total benchmark wall time {runtime_s / 60:.1f} min).",
        "",
        f"- {environment_line(device)}",
        f"- {res}x{res} images (latent {n}x{n}: 4 channels for SDXL, 16 for SD3-Medium and SnapGen), "
        f"precision {args.precision}{' (TF32 matmuls)' if device.type == 'cuda' and args.precision == 'fp32' else ''}, "
        f"batches {','.join(map(str, args.batches))}; random weights (nothing downloaded)",
        f"- latency = median wall time of one forward under torch.no_grad"
        f"{' with torch.cuda.synchronize' if device.type == 'cuda' else ''} after warm-up; "
        f"img/s = batch / median; TFLOP/s = FlopCounterMode FLOPs (matmul, conv, SDPA; batch-1 count "
        f"x batch) / median; 'TFLOP/s best' over all timed batches; ratios are against SnapGen's same "
        f"variant at batch {lat_b}",
        f"- timing policy: {'--quick' if args.quick else 'full'}; n = timed runs at batch {lat_b}"
        + (f"; 1-min load average {args.load_start:.2f} at start, {load_average():.2f} at end "
           f"({os.cpu_count()} logical CPUs)" if args.load_start is not None else ""),
        "",
        markdown_table(headers, rows),
        "",
        "Inputs:",
    ]
    out += [f"- {r.spec.label}: {r.spec.describe}" for r in results]
    out += ["", "Summary:"] + summary_lines(results, args, device)
    notes = [f"- {r.spec.label}: {n_}" for r in results for n_ in r.notes]
    notes += [f"- {r.spec.label}: built in {r.build_s:.1f} s"
              + "".join(f"; {v.variant} setup (compile/capture) {v.setup_s:.1f} s" for v in r.variants
                        if v.variant != "eager" and v.setup_s) for r in results if not r.error]
    if device.type == "cpu" and not args.exact_init:
        notes.append("- weights: torch's bulk random initialisers are replaced during construction by a fill "
                     "from a fixed random pool at the same scale (finite values, ~2x faster to build; "
                     "`--exact-init` uses torch's own); outputs checked finite")
    if args.quick and device.type == "cpu":
        notes.append("- --quick on CPU: batch 1 timed 3-5x after the FLOP-count forward as warm-up; larger "
                     "batches timed 1-3x without warm-up (n per batch in the console log)")
    if args.load_warning:
        notes.insert(0, f"- WARNING: {args.load_warning}")
    if device.type == "cpu":
        contended = [f"{r.spec.label} {v.variant} ({cpu_share(v):.0%})" for r in results for v in r.variants
                     if cpu_share(v) < CONTENDED_SHARE]
        notes.insert(0, "- CPU share = this process's CPU time / (wall time x torch threads) over the timed runs; "
                        "well below 100% means other processes took cores and the timings are inflated"
                     + (f". WARNING, contended: {', '.join(contended)}" if contended else ""))
    out += ["", "Notes:"] + notes
    out += [
        "",
        "Context (SNAPGEN_SPEC.md / project target): GPU target is a SnapGen UNet forward at 1024^2, "
        f"batch 1, bf16 <= {GPU_TARGET_MS:g} ms with torch.compile + CUDA graphs; {REFERENCE_H200}. "
        + ("On CPU there is no target: the figures and ratios above are for comparison only."
           if device.type == "cpu" else ""),
    ]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# CLI


def parse_int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, multiple of 32 (default: 1024 on cuda, 256 on cpu)")
    p.add_argument("--batches", type=parse_int_list, default=[1, 4, 8],
                   help="first = latency batch, the rest = throughput batches (default 1,4,8)")
    p.add_argument("--models", default="snapgen,sdxl,sd3m", help="subset of snapgen,sdxl,sd3m")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add torch.compile variants (default: on for cuda, off for cpu)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="add CUDA-graph replay variants (default: on for cuda; unavailable on cpu)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode, e.g. default | max-autotune-no-cudagraphs (CUDA graphs are "
                        "captured by this script, so a cudagraph mode is not needed; default 'default')")
    p.add_argument("--graph-batches", type=parse_int_list, default=None,
                   help="batches timed for compile / cuda-graph variants (default: all of --batches)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 weights on cuda, fp32 on cpu")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="auto: probe on cuda for the conv UNets, off on cpu")
    p.add_argument("--sd3-tokens", type=int, choices=[154, 333], default=154,
                   help="SD3 text tokens: 154 = 77 CLIP + 77 T5, 333 = 77 CLIP + 256 T5 (default 154)")
    p.add_argument("--snapgen-preset", default="snapgen-1024", help="SnapGen preset (default snapgen-1024)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md",
                   help="markdown file whose UNet-latency section is written (default bench/RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only, leave --out alone")
    p.add_argument("--quick", action="store_true", help="fewer timed runs (CPU: ~1-3 per batch)")
    p.add_argument("--exact-init", action="store_true",
                   help="CPU: use torch's own (slow) random init instead of the pool fill")
    p.add_argument("--retries", type=int, default=2,
                   help="CPU: re-time a measurement whose CPU share shows other processes took cores, up to "
                        "this many times, keeping the least contended (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--verbose", action="store_true", help="tracebacks for failed variants")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - {"snapgen", "sdxl", "sd3m"}
    if unknown or not args.models:
        p.error(f"--models: unknown {sorted(unknown)}; choose from snapgen,sdxl,sd3m")
    return args


def main(argv: list[str] | None = None) -> int:
    wall0 = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.resolution is None:
        args.resolution = 1024 if cuda else 256
    if args.resolution % 32 or not 64 <= args.resolution <= 3072:
        raise SystemExit("--resolution: a multiple of 32 between 64 and 3072")
    if args.precision == "auto":
        args.precision = "bf16" if cuda else "fp32"
    variants = ["eager"]
    want_graphs = cuda if args.cuda_graphs is None else args.cuda_graphs
    want_compile = cuda if args.compile is None else args.compile
    if want_graphs and not cuda:
        print("note: --cuda-graphs ignored: no CUDA device", flush=True)
        want_graphs = False
    if want_graphs:
        variants.append("cuda-graph")
    if want_compile:
        variants.append("compile")
    if want_compile and want_graphs:
        variants.append("compile+cuda-graph")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for --precision fp32
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        with warnings.catch_warnings():  # numpy re-reads float limits and warns about subnormals
            warnings.simplefilter("ignore")
            torch.set_flush_denormal(True)  # denormals from random weights must not skew CPU timings
            import numpy as np

            np.finfo(np.float32), np.finfo(np.float64)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to()
    except ImportError:  # pragma: no cover
        pass

    args.load_start, args.load_warning = load_average(), load_warning(device)
    if args.load_warning:
        print(f"WARNING: {args.load_warning}", flush=True)
    print(f"{environment_line(device)}\n{args.resolution}^2, {args.precision}, batches {args.batches}, "
          f"variants {variants}, models {args.models}{', quick' if args.quick else ''}", flush=True)
    makers = {"snapgen": lambda: snapgen_spec(args.resolution, args.snapgen_preset),
              "sdxl": lambda: sdxl_spec(args.resolution),
              "sd3m": lambda: sd3m_spec(args.resolution, args.sd3_tokens)}
    results: list[ModelResult] = []
    for key in args.models:
        spec = makers[key]()
        try:
            results.append(benchmark_model(spec, args, device, variants))
        except Exception as exc:  # noqa: BLE001 - report the failure, go on with the other models
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            print(f"[{key}] FAILED: {msg}", flush=True)
            traceback.print_exc()
            r = ModelResult(spec)
            r.error = msg
            results.append(r)
            free_memory(device)

    headers, rows = build_rows(results, args.batches, device)
    runtime = time.perf_counter() - wall0
    print()
    print_table(f"UNet latency, {args.resolution}^2, {device_name(device)}, torch {torch.__version__}",
                headers, rows)
    for line in summary_lines(results, args, device):
        print(line)
    print(f"benchmark wall time: {runtime:.1f} s")
    if not args.no_write:
        replace_section(args.out, SECTION, section_body(results, headers, rows, args, device, runtime))
        print(f"wrote section '{SECTION}' of {args.out}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
