"""Shared helpers for the bench/ scripts: device info, timing, fast random init, RESULTS.md sections.

Nothing here downloads anything; models are built from hard-coded configs with random weights.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

# ----------------------------------------------------------------------------------------------
# device


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error (not a silent cpu)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    return torch.device(name)


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()} ({torch.get_num_threads()} torch threads, {os.cpu_count()} logical CPUs)"


def environment_line(device: torch.device) -> str:
    parts = [f"device: {device_name(device)}", f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.append(f"CUDA {torch.version.cuda}")
    try:
        import diffusers

        parts.append(f"diffusers {diffusers.__version__}")
    except ImportError:  # pragma: no cover
        pass
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def load_average() -> float | None:
    """1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_warning(device: torch.device) -> str | None:
    """A warning when other processes compete for the CPU (CPU timings are then inflated)."""
    load, cores = load_average(), os.cpu_count() or 1
    if device.type == "cpu" and load is not None and load > 0.5 * cores:
        return (f"1-min load average {load:.1f} on {cores} logical CPUs before the run: other processes "
                f"compete for the CPU and inflate these timings")
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# timing


@dataclass
class TimingPolicy:
    """How many runs to time: at least `min_runs`, then more until `budget_s` is spent or `max_runs`."""

    warmup: int = 1
    min_runs: int = 3
    max_runs: int = 20
    budget_s: float = 30.0


@dataclass
class Timing:
    times_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # this process's CPU time per run (all threads)

    @property
    def cpu_share(self) -> float:
        """Process CPU time / (wall time x torch threads): ~1 when the run had the CPU to itself.

        On a CPU device this is the contention check (other processes on the machine steal cores);
        on a GPU it only says how busy the host thread was.
        """
        return sum(self.cpu_s) / (sum(self.times_s) * torch.get_num_threads()) if self.times_s else math.nan

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed runs, a rough noise figure."""
        return (max(self.times_s) - min(self.times_s)) / self.median_s if self.times_s else math.nan


def time_callable(fn: Callable[[], object], device: torch.device, policy: TimingPolicy) -> Timing:
    """Wall-clock each call of fn, synchronising the GPU before starting and after each call."""
    for _ in range(policy.warmup):
        fn()
    synchronize(device)
    out = Timing()
    while len(out.times_s) < policy.max_runs and (
        len(out.times_s) < policy.min_runs or sum(out.times_s) < policy.budget_s
    ):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        out.times_s.append(time.perf_counter() - t0)
        out.cpu_s.append(time.process_time() - c0)
    return out


# ----------------------------------------------------------------------------------------------
# fast random init (CPU): torch's default init runs a single-threaded RNG over every weight, which
# is ~25 s per 2B parameters on a small CPU. During model construction we swap the bulk init
# functions for a fill from a fixed random pool (uniform or normal, rolled by a random offset per
# tensor, scaled to the distribution torch would have drawn from). The weights are finite random
# values of the right scale; they are not i.i.d. over the whole tensor (the pool repeats), which
# does not matter for speed measurements. Norm ones/zeros and buffers keep torch's own values.

_POOL_SIZE = (1 << 20) + 7  # odd, so consecutive rows of a weight see different slices


class _Pool:
    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.uniform = torch.rand(_POOL_SIZE, generator=g) * 2 - 1  # U[-1, 1)
        self.normal = torch.randn(_POOL_SIZE, generator=g)
        self.gen = g

    def fill(self, t: torch.Tensor, kind: str, scale: float, shift: float = 0.0) -> torch.Tensor:
        pool = self.uniform if kind == "uniform" else self.normal
        off = int(torch.randint(_POOL_SIZE, (1,), generator=self.gen))
        n = t.numel()
        src = pool[off:off + n] if off + n <= _POOL_SIZE else torch.roll(pool, -off)
        src = src.to(t.dtype)
        with torch.no_grad():
            flat = t.view(-1) if t.is_contiguous() else None
            if flat is None:  # rare: fill a contiguous copy
                tmp = torch.empty(t.numel(), dtype=t.dtype)
                self._tile(tmp, src)
                t.copy_(tmp.view_as(t))
            else:
                self._tile(flat, src)
            if scale != 1.0:
                t.mul_(scale)
            if shift:
                t.add_(shift)
        return t

    @staticmethod
    def _tile(flat: torch.Tensor, src: torch.Tensor) -> None:
        n, p = flat.numel(), src.numel()
        full = n // p
        if full:
            flat[: full * p].view(full, p).copy_(src)
        if n - full * p:
            flat[full * p:].copy_(src[: n - full * p])


@contextlib.contextmanager
def fast_random_init(seed: int = 0, enabled: bool = True) -> Iterator[None]:
    """Patch torch.nn.init's bulk initialisers with a pool fill while models are constructed (CPU only)."""
    if not enabled:
        yield
        return
    init = torch.nn.init
    pool = _Pool(seed)
    saved = {k: getattr(init, k) for k in ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_",
                                           "xavier_uniform_", "xavier_normal_", "trunc_normal_")}

    def _cpu(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.is_floating_point()

    def kaiming_uniform_(t, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
        if not _cpu(t) or t.numel() == 0:
            return saved["kaiming_uniform_"](t, a=a, mode=mode, nonlinearity=nonlinearity)
        fan = init._calculate_correct_fan(t, mode)
        bound = math.sqrt(3.0) * init.calculate_gain(nonlinearity, a) / math.sqrt(fan)
        return pool.fill(t, "uniform", bound)

    def kaiming_normal_(t, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
        if not _cpu(t) or t.numel() == 0:
            return saved["kaiming_normal_"](t, a=a, mode=mode, nonlinearity=nonlinearity)
        fan = init._calculate_correct_fan(t, mode)
        return pool.fill(t, "normal", init.calculate_gain(nonlinearity, a) / math.sqrt(fan))

    def uniform_(t, a=0.0, b=1.0, generator=None):
        if not _cpu(t):
            return saved["uniform_"](t, a, b)
        return pool.fill(t, "uniform", (b - a) / 2, (a + b) / 2)

    def normal_(t, mean=0.0, std=1.0, generator=None):
        if not _cpu(t):
            return saved["normal_"](t, mean, std)
        return pool.fill(t, "normal", std, mean)

    def trunc_normal_(t, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        if not _cpu(t):
            return saved["trunc_normal_"](t, mean, std, a, b)
        pool.fill(t, "normal", std, mean)
        return t.clamp_(a, b)

    def xavier_uniform_(t, gain=1.0, generator=None):
        if not _cpu(t):
            return saved["xavier_uniform_"](t, gain)
        fan_in, fan_out = init._calculate_fan_in_and_fan_out(t)
        return pool.fill(t, "uniform", gain * math.sqrt(6.0 / (fan_in + fan_out)))

    def xavier_normal_(t, gain=1.0, generator=None):
        if not _cpu(t):
            return saved["xavier_normal_"](t, gain)
        fan_in, fan_out = init._calculate_fan_in_and_fan_out(t)
        return pool.fill(t, "normal", gain * math.sqrt(2.0 / (fan_in + fan_out)))

    patched = dict(kaiming_uniform_=kaiming_uniform_, kaiming_normal_=kaiming_normal_, uniform_=uniform_,
                   normal_=normal_, trunc_normal_=trunc_normal_, xavier_uniform_=xavier_uniform_,
                   xavier_normal_=xavier_normal_)
    for k, v in patched.items():
        setattr(init, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(init, k, v)


def assert_finite_params(model: torch.nn.Module, name: str) -> None:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"{name}: non-finite initial weights in {bad[:5]}")


# ----------------------------------------------------------------------------------------------
# formatting and RESULTS.md


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:,.{decimals}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal-ish stdout, else the markdown table."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        print(markdown_table(headers, rows))
        return
    table = Table(title=title, show_lines=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*r)
    width = sum(max([len(h)] + [len(r[i]) for r in rows]) + 3 for i, h in enumerate(headers)) + 1
    Console(width=max(100, width)).print(table)


REPO_ROOT = Path(__file__).resolve().parents[1]


def checkout_relative(path: str) -> str:
    """`path` relative to this checkout when it lies inside it (a release committed under releases/), so a key
    is the same in every clone (CI clones to another folder); any other path as given."""
    for candidate, root in ((Path(path), REPO_ROOT), (Path(path).resolve(), REPO_ROOT.resolve())):
        if candidate.is_relative_to(root):
            return candidate.relative_to(root).as_posix()
    return path


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def replace_section(path: Path, heading: str, body: str, title: str = "# Benchmark results") -> None:
    """Write `heading` + body into a markdown file, replacing that level-2 section if present.

    The section runs from its heading to the next level-1/level-2 heading (or end of file). The
    file is re-read right before writing and replaced atomically, so sections other scripts own
    are kept.
    """
    section = heading.rstrip() + "\n\n" + body.strip() + "\n"
    text = path.read_text() if path.exists() else f"{title}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading.rstrip()), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines))
                    if lines[j].startswith("## ") or lines[j].startswith("# ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(new)
    os.replace(tmp, path)
