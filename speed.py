"""The speed benchmark: seconds, memory and FLOP of one sampling step of each method on SD 2.0,
against the bare network calls the step makes and against diffusers' models on the same weights.

    python speed.py --random-weights --size 512 --methods dps,dmap-same,dmap --steps 3

(`python eval.py speed ...` still runs it, for one release.) From Python: speed.benchmark(
methods="dps,dmap", size=512, steps=3) -> the report dict. Random full-size weights cost exactly
what the real ones cost, so nothing needs a download; --model PATH times the weights you have.
Reading order: (1) the machine: its name, flags and measured matmul rate; (2) the networks:
ours, and diffusers' twins with the same weights; (3) counting and timing network calls, and
PeakMemory; (4) one method's steps; (5) the benchmark and its table; (6) the command.

What is measured, per method and batch size B (README.md, "Speed"):
- s/step: the median over --steps steps after one warm-up step. A step begins at the first
  denoiser call at a new sigma (DPS-like samplers call the denoiser at sigma_i, DMAP at
  sigma_{i+1}), so the sampler runs as it does for users: no callback, no host sync.
- calls: denoiser and decoder (and encoder) calls per step, with a gradient ("grad") or without.
- FLOP: per call kind, counted once by torch.utils.flop_counter on the meta device (no
  arithmetic), times the calls; TFLOP/s = FLOP / (s/step).
- floor: the same calls timed bare (the networks alone, with the same autograd: a guided
  call is the denoiser and the decoder in one graph, one backward), summed; the sampler's
  overhead is s/step / floor - 1.
- memory: the peak during the run above what was in use before it (the weights), PeakMemory.
- diffusers: when it is importable, the bare calls through diffusers' UNet2DConditionModel and
  AutoencoderKL holding our weights, in the same run, as ratios ours / diffusers', and one DPS
  run built from them (its s/step and memory) as the reference row.
"""

import cli  # first: Ctrl-C while torch imports is one line (cli.py)

import argparse
import copy
import ctypes
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

import dmap
import unet as unet_model
import vae as vae_model

# ---------------------------------------------------------------------------------------------
# (1) The machine
# ---------------------------------------------------------------------------------------------

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides bf16 speed


def machine(device: torch.device) -> dict:
    """The processor's name, the flags that decide its bf16 speed, and the thread count."""
    if device.type == "cuda":
        return dict(name=torch.cuda.get_device_name(device), flags=[], native_bf16=True,
                    threads=torch.get_num_threads())
    name, flags = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    have = [f for f in CPU_FLAGS if f in flags]
    return dict(name=name, flags=have, threads=torch.get_num_threads(),
                native_bf16=bool({"avx512_bf16", "amx_bf16"} & flags))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    """The wall time of one fn() call, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """The median wall time of fn() over `repeats` calls after one warm-up call."""
    fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of one large square matmul in `dtype`: what this device can do at best."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, device, 5) / 1e12


# ---------------------------------------------------------------------------------------------
# (2) The networks: ours, and diffusers' with the same weights
# ---------------------------------------------------------------------------------------------


def our_networks(device: torch.device, dtype: torch.dtype, *, model: str | None = None,
                 prediction: str | None = None, seed: int = 0) -> dict:
    """unet, vae, context (1, 77, C) and abar: `model`'s (an SD 2.0 folder or single file;
    `prediction` for a single file), or full-size SD 2.0 networks with random weights seeded by
    `seed` (the same cost: the arithmetic does not look at the values)."""
    if model:
        sd = dmap.load_sd2(model, prediction, device, dtype)
        return dict(unet=sd.unet, vae=sd.vae, context=dmap.encode_prompt(sd, ""), abar=sd.abar,
                    prediction=sd.prediction, channels=sd.unet.cfg.in_channels)
    torch.manual_seed(seed)
    with torch.device(device):
        # frozen, as loaded weights are (checkpoint.load_state) and as diffusers' twins are: a
        # weight that requires a gradient makes the backward keep and do more (1.1-1.2x)
        unet = unet_model.UNet(unet_model.SD2_UNET).to(dtype).eval().requires_grad_(False)
        vae = vae_model.VAE(vae_model.SD2_VAE).to(dtype, memory_format=torch.channels_last) \
            .eval().requires_grad_(False)
        context = torch.randn(1, 77, unet.cfg.cross_attention_dim).to(dtype)
    return dict(unet=unet, vae=vae, context=context, abar=dmap.sd_abar(), prediction="eps",
                channels=unet.cfg.in_channels)


def diffusers_twins(nets: dict) -> dict | None:
    """diffusers' UNet2DConditionModel and AutoencoderKL built from our configs and holding our
    weights (the names are diffusers' own), in diffusers' default layout; None without it."""
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ImportError:
        return None
    u, v = nets["unet"].cfg, nets["vae"].cfg
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention]
    unet = UNet2DConditionModel(
        in_channels=u.in_channels, out_channels=u.out_channels, down_block_types=down,
        up_block_types=[b.replace("Down", "Up") for b in reversed(down)],
        block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block,
        attention_head_dim=list(u.num_heads), cross_attention_dim=u.cross_attention_dim,
        norm_num_groups=u.norm_num_groups, norm_eps=u.norm_eps, use_linear_projection=True)
    n = len(v.block_out_channels)
    vae = AutoencoderKL(
        in_channels=v.channels, out_channels=v.channels, latent_channels=v.latent_channels,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_num_groups)
    param = next(nets["unet"].parameters())
    for theirs, ours in ((unet, nets["unet"]), (vae, nets["vae"])):
        theirs.load_state_dict(ours.state_dict())
        theirs.eval().requires_grad_(False)
        if (param.device.type, param.dtype) != ("cpu", torch.float32):
            theirs.to(param.device, param.dtype)
    return dict(nets, unet=unet, vae=vae)


def unet_call(nets: dict):
    """(x, t, context) -> eps_hat through our UNet or a diffusers twin."""
    if isinstance(nets["unet"], unet_model.UNet):
        return nets["unet"]
    return lambda x, t, c: nets["unet"](x, t, encoder_hidden_states=c).sample


def pipeline(nets: dict) -> dmap.Pipeline:
    """Our networks as dmap.Pipeline, for its decode and encode (the samplers' own)."""
    return dmap.Pipeline(nets["unet"], nets["vae"], None, None, nets["abar"], nets["prediction"])


def decode_call(nets: dict):
    """Scaled latent -> image in the latent's dtype: dmap.Pipeline.decode, or the same through
    a diffusers AutoencoderKL."""
    vae, dtype = nets["vae"], next(nets["vae"].parameters()).dtype
    if isinstance(vae, vae_model.VAE):
        return pipeline(nets).decode
    return lambda z: vae.decode((z / vae_model.SCALING_FACTOR).to(dtype)).sample.to(z.dtype)


def encode_call(nets: dict):
    """Image -> scaled latent (the posterior mean; PSLD, ReSample): dmap.Pipeline.encode, or
    the same through a diffusers AutoencoderKL."""
    vae, dtype = nets["vae"], next(nets["vae"].parameters()).dtype
    if isinstance(vae, vae_model.VAE):
        return pipeline(nets).encode
    return lambda x: vae.encode(x.to(dtype)).latent_dist.mean.to(x.dtype) * \
        vae_model.SCALING_FACTOR


# ---------------------------------------------------------------------------------------------
# (3) Counting and timing network calls
# ---------------------------------------------------------------------------------------------

KINDS = ("denoiser", "decoder", "encoder")


class PeakMemory:
    """Peak memory in MB over a with-block (`mb`), and its rise over what was in use at the start
    (`above`): torch.cuda.max_memory_allocated on a GPU; on the CPU the resident set size
    (/proc/self/statm) polled every 20 ms by a thread (rarely enough not to slow the threads
    doing the work; a network's peak lasts far longer), after glibc has handed freed pages back
    (malloc_trim), so the start is what is in use (both None without /proc)."""

    def __init__(self, device: torch.device):
        self.device, self.mb, self.above, self.stop = device, None, None, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def poll(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            try:
                ctypes.CDLL(None).malloc_trim(0)
            except (OSError, AttributeError):  # not glibc: the start may include freed pages
                pass
            self.start = self.peak = self.rss()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "thread"):
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.rss())
        if hasattr(self, "start"):
            self.mb, self.above = self.peak / 2**20, (self.peak - self.start) / 2**20


class Enough(Exception):
    """Raised by a Recorder when it has marked the start of the step after the last measured."""


class Recorder:
    """Wraps the denoiser, the decoder and the encoder of a run: counts their calls with and
    without a gradient, and marks the time (a CUDA event: no host sync) where a step begins,
    at the first denoiser call at a new sigma; the `marks`-th mark ends the run (Enough)."""

    def __init__(self, device: torch.device, marks: int):
        self.device, self.sigma, self.marks, self.stop = device, None, [], marks
        self.calls = {(kind, grad): 0 for kind in KINDS for grad in (False, True)}

    def mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event, dict(self.calls)
        return time.perf_counter(), dict(self.calls)

    def wrap(self, kind: str, fn):
        def counted(x, *rest):
            if kind == "denoiser" and rest[0] != self.sigma:
                self.sigma = rest[0]
                self.marks.append(self.mark())
                if len(self.marks) == self.stop:
                    raise Enough
            self.calls[kind, torch.is_grad_enabled() and x.requires_grad] += 1
            return fn(x, *rest)
        return counted

    def steps(self, last: int) -> tuple[list[float], dict]:
        """The last `last` steps' durations (s) and their mean calls per step."""
        marks = self.marks[-last - 1:]
        if self.device.type == "cuda":
            sync(self.device)
            seconds = [a[0].elapsed_time(b[0]) / 1e3 for a, b in zip(marks[:-1], marks[1:],
                                                                      strict=True)]
        else:
            seconds = [b[0] - a[0] for a, b in zip(marks[:-1], marks[1:], strict=True)]
        calls = {k: (marks[-1][1][k] - marks[0][1][k]) / last for k in self.calls}
        return seconds, {f"{k[0]} {'grad' if k[1] else 'fwd'}": c for k, c in calls.items() if c}


def bare_call(nets: dict, kind: str, grad: bool, batch: int, size: int):
    """One network call of `kind` on fresh inputs, with the backward to its input when `grad`
    (as a guided step computes it: the gradient w.r.t. x only), as a no-argument function.
    kind "guided" is the denoiser and the decoder on its output in one graph, as A(x0_hat)."""
    p = next(nets["unet"].parameters())
    latent = (batch, nets["channels"], size // 8, size // 8)
    denoiser = dmap.SDDenoiser(unet_call(nets), nets["context"], nets["abar"], nets["prediction"])
    x, fn = torch.randn(latent, device=p.device), {
        "denoiser": lambda x: denoiser(x, 1.0), "decoder": decode_call(nets),
        "guided": lambda x: decode_call(nets)(denoiser(x, 1.0))}.get(kind)
    if kind == "encoder":
        x, fn = torch.randn(batch, 3, size, size, device=p.device), encode_call(nets)

    def call():
        with torch.set_grad_enabled(grad):
            xg = x.detach().requires_grad_(grad)
            out = fn(xg)
            if grad:
                torch.autograd.grad(out, xg, torch.ones_like(out))
    return call


def floor_calls(calls: dict) -> dict:
    """A step's calls as the floor times them: a denoiser call with a gradient and the decoder
    call on its output are one "guided grad" call (one graph, one backward, as in the step);
    the others alone."""
    paired = min(calls.get("denoiser grad", 0), calls.get("decoder grad", 0))
    parts = dict(calls, **{"guided grad": paired})
    for kind in ("denoiser grad", "decoder grad"):
        parts[kind] = calls.get(kind, 0) - paired
    return {kind: n for kind, n in parts.items() if n}


def call_flops(nets: dict, batch: int, size: int) -> dict:
    """FLOP of each call kind (torch.utils.flop_counter: matmuls, convolutions, attention),
    counted on meta-device copies of the networks: no arithmetic is done."""
    with torch.device("meta"):
        meta = dict(nets, unet=unet_model.UNet(nets["unet"].cfg).requires_grad_(False),
                    vae=vae_model.VAE(nets["vae"].cfg).requires_grad_(False),
                    context=torch.zeros(nets["context"].shape))
    flops = {}
    for kind in KINDS:
        for grad in (False, True):
            with FlopCounterMode(display=False) as counter:
                bare_call(meta, kind, grad, batch, size)()
            flops[f"{kind} {'grad' if grad else 'fwd'}"] = counter.get_total_flops()
    return flops


# ---------------------------------------------------------------------------------------------
# (4) One method's steps
# ---------------------------------------------------------------------------------------------


def method_settings(method: str, op: str, size: int):
    """(sampler, steps per image, keyword arguments, operator) of a method name (dmap.METHODS)
    with the paper's defaults (dmap.sampler_settings: zeta per method and operator, the DMAP
    budget's K, zeta scale and steps; dmap.make_operator: SR x8, blur std 3, seed 0)."""
    sampler, budget = dmap.METHODS[method]
    steps, kwargs, _ = dmap.sampler_settings(sampler, op, dmap_setting=budget)
    return sampler, steps, kwargs, dmap.make_operator(op, size)[0]


def run_steps(nets: dict, method: str, op_name: str, x_ref, steps: int, batch: int) -> dict:
    """One warm-up step and `steps` measured ones of `method` at the start of its full schedule
    (FreeDOM's window and ReSample's optimisations come later: these are their plain steps), on
    a batch of `batch` copies of the measurement of x_ref."""
    device = x_ref.device
    sampler, per_image, kwargs, op = method_settings(method, op_name, x_ref.shape[-1])
    op = op.to(device)
    generator = torch.Generator(device).manual_seed(0)
    y = op.measure(x_ref.expand(batch, -1, -1, -1), 0.0, generator)
    # marks: the warm-up step's start and end, then one per measured step; DMAP's first mark is
    # its call before the loop, at sigma_0 (its steps call the denoiser at sigma_{i+1})
    record = Recorder(device, marks=steps + 2 + (sampler == "dmap"))
    denoiser = record.wrap("denoiser", dmap.SDDenoiser(unet_call(nets), nets["context"],
                                                        nets["abar"], nets["prediction"]))
    decode = record.wrap("decoder", decode_call(nets))
    encode = record.wrap("encoder", encode_call(nets))
    parts = dmap.model_parts(sampler, H=op, adjoint=getattr(op, "adjoint", None), decode=decode,
                             encode=encode)
    sigmas = dmap.sd_sigmas(per_image, nets["abar"]).to(device)
    if len(sigmas) < steps + 3:
        raise ValueError(f"{method} runs {per_image} steps; --steps must be below {per_image - 1}")
    latent = (batch, nets["channels"], x_ref.shape[-1] // 8, x_ref.shape[-1] // 8)
    x = sigmas[0].item() * dmap.noise_like(torch.empty(latent, device=device), generator)
    with PeakMemory(device) as memory:
        try:
            dmap.SAMPLERS[sampler](denoiser, x, y, lambda z: op(decode(z)), sigmas,
                                   generator=generator, **parts, **kwargs)
        except Enough:
            pass
    seconds, calls = record.steps(steps)
    return dict(method=method, batch=batch, steps_per_image=per_image,
                s_per_step=statistics.median(seconds), step_seconds=seconds, calls=calls,
                first_step_s=record.steps(steps + 1)[0][0], peak_mb=memory.above)


def gradient_cosines(nets32: dict, nets: dict, x_ref, sigmas=(14.0, 1.0, 0.1)) -> dict:
    """The cosine between the DPS guidance gradient with `nets` (reduced precision) and with
    the float32 ones, at each sigma, for x = encode(x_ref) + sigma * noise (SR x8)."""
    op = method_settings("dps", "sr", x_ref.shape[-1])[3].to(x_ref.device)
    y = op.measure(x_ref, 0.0, None)
    with torch.no_grad():
        z = encode_call(nets32)(x_ref)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(z.device)
    cosines = {}
    for sigma in sigmas:
        grads = []
        for n in (nets32, nets):
            denoiser = dmap.SDDenoiser(unet_call(n), n["context"], n["abar"], n["prediction"])
            decode = decode_call(n)
            grads.append(dmap.measurement_grad(denoiser, z + sigma * noise, sigma, y,
                                               lambda v, d=decode: op(d(v)))[2].flatten())
        cosines[sigma] = torch.nn.functional.cosine_similarity(*grads, dim=0).item()
    return cosines


def step_profile(nets: dict, method: str, op: str, x_ref, top: int = 10) -> list[dict]:
    """Where a step's time goes: torch.profiler over a warm-up and one step of `method`, the
    `top` operators by their own (self) time, with their share and call count."""
    device = x_ref.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_steps(nets, method, op, x_ref, 1, 1)
    time_of = (lambda e: e.self_device_time_total) if device.type == "cuda" else \
        (lambda e: e.self_cpu_time_total)
    events = sorted(prof.key_averages(), key=time_of, reverse=True)
    total = sum(time_of(e) for e in events)
    return [dict(op=e.key, share=time_of(e) / total, calls=e.count) for e in events[:top]]


# ---------------------------------------------------------------------------------------------
# (5) The benchmark and its table
# ---------------------------------------------------------------------------------------------


def reference_image(path: str | None, size: int, device) -> torch.Tensor:
    """The measured image (1, 3, size, size) in [-1, 1]: --image, or a smooth seeded pattern
    (the step costs the same whatever the pixels are)."""
    if path:
        return dmap.read_image(path, size).to(device)
    coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").to(device)


OPS = ("sr", "blur", "inpaint")  # the operators a step is timed with (their own cost is small)
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_METHODS = ("dps", "dmap-same", "dmap")
# the methods the benchmark times: the paper's names (dmap.METHODS) without the CSE, which is
# not a sampler on SD 2.0 itself
METHODS = tuple(m for m in dmap.METHODS if m != "cse")


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """A comma list (or a list) of method names as a list: each in METHODS, distinct, none with
    a CSE."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [m.strip() for m in names if m.strip()]
    if any("cse" in m for m in names):
        raise ValueError("the benchmark times the samplers on SD 2.0 itself; drop the CSE methods")
    for m in names:
        if m not in METHODS:
            raise ValueError(f"unknown method {m}; choose from {', '.join(METHODS)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--methods needs distinct names, got {methods!r}")
    return names


def benchmark(*, methods: str | Sequence[str] = DEFAULT_METHODS, size: int = 512, steps: int = 3,
              batch: int | Sequence[int] = (1,), model: str | None = None,
              prediction: str | None = None, dtype: str = "float32", device: str | None = None,
              op: str = "sr", checkpointing: str | Sequence[str] = ("none",),
              image: str | None = None, seed: int = 0, diffusers: bool = True,
              profile: bool = False, compile: bool = False) -> dict:
    """The benchmark (the module docstring says what is measured) -> the report: the machine,
    FLOP per call, one row per checkpointing setting, batch size and method (in that order),
    and, with `diffusers` (when it is importable), the comparison with diffusers' models;
    `profile`: where the first method's step spends its time; `compile`: the methods again
    (checkpointing none, each batch) with the networks compiled (dmap.compile_networks), the
    compile time being the first step's time less a step's. methods: names of METHODS (a
    comma list or a list); steps: measured steps per method, after one warm-up step; batch and
    checkpointing (dmap.CHECKPOINTING): one value or several; model: an SD 2.0 folder or single
    file (None: full-size networks with random weights seeded by `seed`); image: the measured
    image (None: a smooth seeded pattern); device: None is cuda where there is one, else cpu.
    ValueError on bad input, before anything slow runs."""
    methods = parse_methods(methods)
    batches = [batch] if isinstance(batch, int) else list(batch)
    settings = [checkpointing] if isinstance(checkpointing, str) else list(checkpointing)
    if size < 8 or size % 8:
        raise ValueError(f"--size must be a multiple of 8, got {size}")
    if steps < 1 or not batches or min(batches) < 1:
        raise ValueError(f"--steps and --batch must be >= 1, got {steps}, {batches}")
    for name, value, choices in (("--op", [op], OPS), ("--dtype", [dtype], DTYPES),
                                 ("--checkpointing", settings, dmap.CHECKPOINTING)):
        if not value or any(v not in choices for v in value):
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value}")
    device = dmap.usable_device(device or dmap.DEVICE)
    torch_dtype = getattr(torch, dtype)
    report = dict(machine=machine(device), size=size, dtype=dtype, steps=steps,
                  torch=torch.__version__, random_weights=model is None)
    if device.type == "cpu" and torch_dtype != torch.float32 and \
            not report["machine"]["native_bf16"]:
        report["warning"] = (f"{report['machine']['name']} has no native bf16 (no avx512_bf16 "
                             "or amx in /proc/cpuinfo): reduced precision is emulated and slow")
    report["matmul_tflops"] = matmul_rate(device, torch_dtype)
    nets = our_networks(device, torch_dtype, model=model, prediction=prediction, seed=seed)
    x_ref = reference_image(image, size, device)
    nets32 = nets  # float32 networks: the reference of the cosines and of diffusers' DPS row
    if torch_dtype != torch.float32:
        nets32 = dict(nets, unet=copy.deepcopy(nets["unet"]).float(),
                      vae=copy.deepcopy(nets["vae"]).float(), context=nets["context"].float())
        report["grad_cosine_vs_float32"] = gradient_cosines(nets32, nets, x_ref)
    report["call_flop"] = call_flops(nets, 1, size)  # per image: FLOP are linear in B
    rows, bare = [], {}
    for setting in settings:
        dmap.set_checkpointing(nets["unet"], nets["vae"], setting)
        for b in batches:
            for method in methods:
                try:
                    rows.append(measured_row(nets, method, x_ref, op=op, steps=steps, batch=b,
                                             checkpointing=setting, bare=bare,
                                             call_flop=report["call_flop"], compiled=False))
                    progress(rows[-1])
                except torch.cuda.OutOfMemoryError:  # the largest batch that fits: the one before
                    torch.cuda.empty_cache()
                    rows.append(dict(method=method, batch=b, checkpointing=setting,
                                     error="out of memory"))
    dmap.set_checkpointing(nets["unet"], nets["vae"], "none")
    if profile:
        report["profile"] = dict(method=methods[0], ops=step_profile(nets, methods[0], op, x_ref))
    if diffusers:
        report["diffusers"] = compare_with_diffusers(nets, nets32, x_ref, op=op, steps=steps)
    if compile:  # last: the networks are compiled in place
        dmap.compile_networks(pipeline(nets))
        for b in batches:
            for method in methods:
                rows.append(measured_row(nets, method, x_ref, op=op, steps=steps, batch=b,
                                         checkpointing="none", bare=bare,
                                         call_flop=report["call_flop"], compiled=True))
                rows[-1]["compile_s"] = rows[-1]["first_step_s"] - rows[-1]["s_per_step"]
                progress(rows[-1])
    report["rows"] = rows
    return report


def measured_row(nets: dict, method: str, x_ref, *, op: str, steps: int, batch: int,
                 checkpointing: str, bare: dict, call_flop: dict, compiled: bool) -> dict:
    """run_steps' row with its network floor (each call kind timed bare once per setting,
    compilation and batch, kept in `bare`), overhead, FLOP, TFLOP/s and throughput."""
    row = run_steps(nets, method, op, x_ref, steps, batch)
    parts = floor_calls(row["calls"])
    for kind in parts:
        if (checkpointing, compiled, batch, kind) not in bare:
            name, mode = kind.split()
            call = bare_call(nets, name, mode == "grad", batch, x_ref.shape[-1])
            bare[checkpointing, compiled, batch, kind] = median_seconds(call, x_ref.device, steps)
    floor = sum(n * bare[checkpointing, compiled, batch, kind] for kind, n in parts.items())
    flop = batch * sum(n * call_flop[kind] for kind, n in row["calls"].items())
    per_image = row["s_per_step"] * row["steps_per_image"]  # seconds for the batch's images
    return dict(row, checkpointing=checkpointing, compiled=compiled, floor_s=floor,
                overhead=row["s_per_step"] / floor - 1, flop=flop,
                tflops=flop / row["s_per_step"] / 1e12, s_per_image=per_image / batch,
                images_per_s=batch / per_image)


def compare_with_diffusers(nets: dict, nets32: dict, x_ref, *, op: str, steps: int) -> dict | None:
    """Bare UNet and decoder calls, ours / diffusers' (alternating, same weights, same dtype),
    and the reference row: DPS with diffusers' models in float32 (None without diffusers)."""
    twins = diffusers_twins(nets)
    if twins is None:
        return None
    device, ratios = x_ref.device, {}
    for kind in ("denoiser", "decoder"):
        for grad in (False, True):
            calls = [bare_call(n, kind, grad, 1, x_ref.shape[-1]) for n in (nets, twins)]
            for call in calls:  # warm-up, then ours and theirs in turn: the same machine noise
                call()
            # at least 3 pairs; the ratio is taken pair by pair (a drift of the machine's speed
            # moves both of a pair), its median and its range say how far to trust it
            times = [[seconds(call, device) for call in calls] for _ in range(max(3, steps))]
            ours, theirs = (statistics.median(t) for t in zip(*times, strict=True))
            pairs = [a / b for a, b in times]
            ratios[f"{kind} {'grad' if grad else 'fwd'}"] = dict(
                ours_s=ours, diffusers_s=theirs, ratio=statistics.median(pairs),
                ratio_range=[min(pairs), max(pairs)], pairs=len(pairs))
    del twins
    row = run_steps(diffusers_twins(nets32), "dps", op, x_ref, steps, 1)
    progress(dict(row, method="dps (diffusers' models)"))
    return dict(calls=ratios, dps=row)


def progress(row: dict) -> None:
    print(f"  {row['method']} (batch {row['batch']}): {row['s_per_step']:.3g} s/step, "
          f"{row['peak_mb'] or 0:.0f} MB", file=sys.stderr, flush=True)


def table_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"{m['name']} ({', '.join(m['flags']) or 'no avx2/avx512/amx'}; {m['threads']} "
             f"threads), torch {report['torch']}, {report['dtype']}, {report['size']} px, "
             f"median of {report['steps']} steps; matmul {report['matmul_tflops']:.3g} TFLOP/s",
             ""]
    if "warning" in report:
        lines += [f"warning: {report['warning']}", ""]
    lines += ["| method | ckpt | B | s/step | floor s | overhead | TFLOP/step | TFLOP/s | "
              "peak MB | s/image | images/s | calls/step |", "|" + "---|" * 12]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['checkpointing']} | {r['batch']} | "
                         f"{r['error']} |" + " |" * 9)
            continue
        calls = ", ".join(f"{v:g} {k}" for k, v in r["calls"].items())
        method = r["method"] + (" compiled" if r["compiled"] else "")
        lines.append(f"| {method} | {r['checkpointing']} | {r['batch']} | "
                     f"{r['s_per_step']:.3g} | {r['floor_s']:.3g} | {100 * r['overhead']:+.1f}% | "
                     f"{r['flop'] / 1e12:.3g} | {r['tflops']:.3g} | {r['peak_mb'] or 0:.0f} | "
                     f"{r['s_per_image']:.4g} | {r['images_per_s']:.3g} | {calls} |")
    if report.get("diffusers"):
        d = report["diffusers"]
        lines += ["", "| bare call | ours s | diffusers s | ours / diffusers (median of pairs) | "
                  "range | pairs |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['ours_s']:.3g} | {v['diffusers_s']:.3g} | {v['ratio']:.3f} | "
                  f"{v['ratio_range'][0]:.3f}-{v['ratio_range'][1]:.3f} | {v['pairs']} |"
                  for k, v in d["calls"].items()]
        ours = next((r for r in report["rows"] if r["method"] == "dps" and r["batch"] == 1
                     and r["checkpointing"] == "none" and "error" not in r), None)
        lines += ["", f"DPS step built from diffusers' models in float32: "
                  f"{d['dps']['s_per_step']:.3g} s/step, peak {d['dps']['peak_mb'] or 0:.0f} MB "
                  "above the weights"
                  + (f" (ours in {report['dtype']}: "
                     f"{ours['s_per_step'] / d['dps']['s_per_step']:.3f}x the time, "
                     f"{(ours['peak_mb'] or 0) / (d['dps']['peak_mb'] or math.inf):.3f}x the "
                     "memory)" if ours else "")]
    for r in (r for r in report["rows"] if r.get("compiled")):
        eager = next((e for e in report["rows"] if not e.get("compiled") and "error" not in e
                      and (e["method"], e["batch"], e["checkpointing"]) ==
                      (r["method"], r["batch"], "none")), None)
        if eager:
            lines += ["", f"{r['method']} (batch {r['batch']}) compiled: the first step "
                      f"{r['first_step_s']:.3g} s ({r['compile_s']:.3g} s compiling), then "
                      f"{r['s_per_step']:.3g} s/step, {r['s_per_step'] / eager['s_per_step']:.3f}x "
                      "the uncompiled step"]
    if "profile" in report:
        lines += ["", f"Profile of a {report['profile']['method']} step (self time):",
                  ", ".join(f"{o['op']} {100 * o['share']:.1f}% ({o['calls']} calls)"
                            for o in report["profile"]["ops"])]
    if "grad_cosine_vs_float32" in report:
        cos = ", ".join(f"sigma {s:g}: {c:.5f}" for s, c in
                        report["grad_cosine_vs_float32"].items())
        lines += ["", f"DPS gradient cosine, {report['dtype']} vs float32: {cos}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# (6) The command line: python speed.py [flags] (and, for one release, python eval.py speed)
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (python speed.py; eval.py speed adds them to its subcommand)."""
    p.add_argument("--model", help="an SD 2.0 folder or single file to time (default: full-size "
                   "SD 2.0 networks with random weights, the same cost)")
    p.add_argument("--random-weights", action="store_true",
                   help="full-size random weights (the default without --model)")
    p.add_argument("--prediction", choices=["eps", "v"], help="for a single-file --model")
    p.add_argument("--size", type=int, default=512,
                   help="image size in pixels (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="network dtype; latents, sigmas and the guidance step stay float32 "
                   "(default: %(default)s)")
    p.add_argument("--device", default=dmap.DEVICE,
                   help="torch device (default: %(default)s)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of {', '.join(METHODS)} (default: %(default)s)")
    p.add_argument("--op", default="sr", choices=OPS,
                   help="the measurement operator (its own cost is small) (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per method, after one "
                   "warm-up step (default: %(default)s)")
    p.add_argument("--batch", type=int, nargs="+", default=[1],
                   help="batch sizes (images restored at once), e.g. 1 2 4 (default: 1)")
    p.add_argument("--checkpointing", nargs="+", default=["none"], choices=dmap.CHECKPOINTING,
                   help="activation checkpointing: none, the VAE decoder's, or also the UNet's "
                   "(several: one row each) (default: none)")
    p.add_argument("--image", help="the image to measure (default: a smooth seeded pattern)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights (default: %(default)s)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers comparison")
    p.add_argument("--profile", action="store_true",
                   help="also profile a step of the first method: the ops that take its time")
    p.add_argument("--compile", action="store_true", help="then the methods again with the "
                   "networks compiled (torch.compile; minutes to compile on a CPU): their "
                   "compile time and step time")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite --json")


def command(args: argparse.Namespace) -> str:
    """The command's body from add_arguments' flags (python speed.py, eval.py speed): the
    benchmark, its table on stdout, --json; -> the closing line."""
    if args.model and args.random_weights:
        raise ValueError("pass --model PATH or --random-weights, not both")
    if args.json and os.path.exists(args.json) and not args.force:
        raise ValueError(f"{args.json} exists; pass --force to overwrite it")
    report = benchmark(methods=args.methods, size=args.size, steps=args.steps, batch=args.batch,
                       model=args.model, prediction=args.prediction, dtype=args.dtype,
                       device=args.device, op=args.op, checkpointing=args.checkpointing,
                       image=args.image, seed=args.seed, diffusers=not args.no_diffusers,
                       profile=args.profile, compile=args.compile)
    print(table_markdown(report))
    if args.json:
        cli.write_json(args.json, report)
    return f"benchmarked {len(report['rows'])} rows"


def command_line() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def main(argv=None) -> int:
    args = command_line().parse_args(argv)
    start = time.perf_counter()

    def body():
        return f"{command(args)} in {time.perf_counter() - start:.0f} s"

    return cli.run(body, interrupted="during the benchmark; nothing written", to_stderr=True)


if __name__ == "__main__":
    sys.exit(main())
