"""What the benchmarks share: flags, the config, machine info, percentiles, writing results.

    ap = common.base_parser("reply", __doc__)       # --config, --out-dir, --threads, sampling ...
    ...
    sys.exit(common.main("reply", ap, run, markdown, argv))

``main`` sets the process up (``bot.process``), runs ``await run(args) -> dict``, adds the
machine (cores, load average before and after, package versions) and the settings, writes
``OUT/NAME.json`` and ``OUT/NAME.md`` and prints the markdown. A result may hold
``checks`` ({name: bool}); a false one makes the exit code 1.

Also the ``--set key=value`` parsing the older scripts (taste_screen, round_time) use.
Nothing here imports torch at module level.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from bot import process
from bot.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench" / "out"
PACKAGES = ("torch", "transformers", "peft", "ctranslate2", "tokenizers", "safetensors", "aiosqlite")

# The settings the issue measured with (flags change them; the config's [sampling] is overridden).
TEMPERATURE, TOP_P, NEW_TOKENS = 0.7, 0.9, 48


# -- --set key=value (bench/taste_screen.py, the train benchmark) ----------------------

def value(text: str):
    """'3' → 3, '1e-3' → 0.001, 'true'/'false' → bool, anything else stays a string."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def parse_overrides(pairs: list[str]) -> dict:
    """``["lr=1e-3", "epochs=3"]`` → ``{"lr": 0.001, "epochs": 3}``; a pair without '=' is an error."""
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"--set takes KEY=VALUE pairs, got {bad[0]!r}")
    return {k: value(v) for k, v in (p.split("=", 1) for p in pairs)}


# -- flags and the config --------------------------------------------------------------

def base_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("common to every benchmark")
    g.add_argument("--config", type=Path, default=None,
                   help="a reactlearn TOML (default: the built-in defaults, i.e. the real default model); "
                        "its data_dir is replaced by a temp folder")
    g.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"where NAME.json and NAME.md go ({OUT_DIR})")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: the config's model.threads / torch default)")
    g.add_argument("--engine", default=None,
                   help="set serving.engine (ctranslate2 | torch) where this checkout's config has it")
    g.add_argument("--temperature", type=float, default=TEMPERATURE, help=f"sampling temperature ({TEMPERATURE})")
    g.add_argument("--top-p", type=float, default=TOP_P, help=f"nucleus mass ({TOP_P})")
    g.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                   help=f"max new tokens per reply ({NEW_TOKENS}; the plain baseline is forced to exactly this)")
    g.add_argument("--log-level", default="WARNING", help="WARNING by default: INFO logs a line per reply and vote")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--keep-data", action="store_true", help="keep the temp data folders (store, versions) and say where")
    return ap


def bench_config(args, data_dir: Path, **serving):
    """The config named by ``--config`` (or the defaults) with a temp ``data_dir``, the
    benchmark's sampling settings, ``--threads``, ``--engine`` and any ``serving`` overrides."""
    from bot.config import load_config, validate

    cfg = load_config(args.config, env={})          # env={}: no chat tokens, no REACTLEARN_CONFIG
    cfg.data_dir = str(data_dir)
    cfg.platforms = []
    cfg.sampling.temperature, cfg.sampling.top_p = args.temperature, args.top_p
    cfg.sampling.max_new_tokens = args.new_tokens
    if args.threads:
        cfg.model.threads = args.threads
    if args.engine is not None:
        if not hasattr(cfg.serving, "engine"):
            raise SystemExit("--engine: this checkout's config has no serving.engine setting")
        cfg.serving.engine = args.engine
    for key, val in serving.items():
        setattr(cfg.serving, key, val)
    return validate(cfg)


def engine(cfg) -> str:
    """The serving engine the policy will use ("torch" where the setting does not exist yet)."""
    return str(getattr(cfg.serving, "engine", "torch"))


def engine_in_use(policy) -> str:
    """The engine a started policy actually runs on (it may fall back from the configured one)."""
    eng = getattr(policy, "engine", None)
    if eng is None:
        return "torch (policy without engines)"
    return str(getattr(eng, "name", type(eng).__name__))


def settings(cfg) -> dict:
    """What the product was configured with, for the JSON."""
    return {"model": cfg.model.name, "dtype": cfg.model.dtype, "engine": engine(cfg),
            "sampling": dataclasses.asdict(cfg.sampling), "serving": dataclasses.asdict(cfg.serving)}


_TEMP_DIRS: list[Path] = []


def temp_dir(prefix: str) -> Path:
    """A fresh temp folder, removed when :func:`main` ends (unless ``--keep-data``)."""
    path = Path(tempfile.mkdtemp(prefix=f"reactlearn-bench-{prefix}-"))
    _TEMP_DIRS.append(path)
    return path


def prompts(n: int | None = None) -> list[str]:
    """Everyday chat prompts (trainer/prompts.txt), cycled to ``n``."""
    lines = (ROOT / "trainer" / "prompts.txt").read_text(encoding="utf-8").splitlines()
    pool = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return pool if n is None else [pool[i % len(pool)] for i in range(n)]


# -- numbers ------------------------------------------------------------------------------

def percentile(xs, p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation between ranks; None for no data."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats(xs, digits: int = 4) -> dict:
    """n, mean, min, p50, p95, p99, max of ``xs`` (rounded); Nones where there is no data."""
    xs = [x for x in xs if x is not None]
    out = {"n": len(xs), "mean": sum(xs) / len(xs) if xs else None, "min": min(xs) if xs else None}
    for p in (50, 95, 99):
        out[f"p{p}"] = percentile(xs, p)
    out["max"] = max(xs) if xs else None
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in out.items()}


def ratio(a, b, digits: int = 3) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def rnd(x, digits: int = 3):
    return round(x, digits) if isinstance(x, float) else x


def rss_mib() -> float | None:
    """Resident memory of this process now, in MiB (Linux /proc; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


async def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
    """Poll ``pred`` on the event loop until true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.perf_counter() + timeout
    while not pred():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(step)
    return True


# -- machine ----------------------------------------------------------------------------

def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(load_before: tuple[float, float, float]) -> dict:
    """Cores, load average (before the benchmark and now), packages, threads, platform."""
    torch = sys.modules.get("torch")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cores": os.cpu_count(), "usable_cores": usable, "cpu": _cpu_model(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "packages": {p: _version(p) for p in PACKAGES},
        "torch_threads_at_end": torch.get_num_threads() if torch is not None else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "python": platform.python_version(), "platform": platform.platform(), "git": _git(),
    }


def machine_line(m: dict) -> str:
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v and k in ("torch", "transformers", "peft",
                                                                               "ctranslate2"))
    return (f"{m['cores']} cores ({m['cpu']}), load average {m['load_avg_before'][0]} before / "
            f"{m['load_avg_after'][0]} after, torch threads at the end {m['torch_threads_at_end']}, {pk}; git {m['git']}")


# -- output -----------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; None prints as n/a, floats with 3 significant-ish digits."""
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _clean(x):
    """JSON-safe: NaN/inf → None, paths → str, tuples → lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write(name: str, data: dict, md: str, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, mdp = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(_clean(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    mdp.write_text(md + "\n", encoding="utf-8")
    return js, mdp


def header(name: str, title: str, data: dict) -> str:
    st = data.get("settings", {})
    eng = f"Engine: {st['engine']}" if "engine" in st else "Engine: n/a"
    if st.get("engine_in_use"):
        eng += f" (running: {st['engine_in_use']})"
    return (f"## {name}: {title}\n\n{data['when']}, {data['seconds']:.0f} s. Machine: {machine_line(data['machine'])}."
            f"\n{eng}.\n")


def failed_checks(data: dict) -> list[str]:
    return [k for k, ok in data.get("checks", {}).items() if not ok]


def main(name: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Awaitable[dict]],
         markdown: Callable[[dict], str], argv: list[str] | None = None) -> int:
    """Parse, set the process up, run, write OUT/NAME.json + .md, print; 1 if a check failed."""
    args = parser.parse_args(argv)
    process.quiet_threads()
    if not logging.getLogger().handlers:       # keep a logging set-up the caller made (pytest's)
        process.setup_logging(args.log_level)
    process.set_torch_threads(args.threads)
    load_before, t0, when = os.getloadavg(), time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        result = asyncio.run(run(args))
    except ConfigError as e:         # --config: one line, exit 2, as the bot and the trainer
        return process.fail(f"config error: {e}")
    finally:
        for d in _TEMP_DIRS:
            if args.keep_data:
                print(f"kept {d}", file=sys.stderr)
            else:
                shutil.rmtree(d, ignore_errors=True)
        _TEMP_DIRS.clear()
    data = {"benchmark": name, "when": when, "seconds": round(time.perf_counter() - t0, 2),
            "machine": machine(load_before), "args": {k: v for k, v in vars(args).items()}, **result}
    data = _clean(data)
    md = markdown(data)
    bad = failed_checks(data)
    if bad:
        md += "\n\n**Failed checks:** " + ", ".join(bad)
    js, mdp = write(name, data, md, args.out_dir)
    print(md)
    print(f"\nwrote {js} and {mdp}", flush=True)
    return 1 if bad else 0
