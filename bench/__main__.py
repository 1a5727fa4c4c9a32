"""python -m bench [NAME ...] [flags]: run the benchmarks one after the other, each in its own process.

    python -m bench                                   # all: reply load lag swap votes train memory
    python -m bench reply load --config tiny.toml     # some
    python -m bench load swap --duration 5 --swaps 3  # a flag goes to every named benchmark that has it

A flag no named benchmark knows is an error; ``python -m bench.NAME --help`` lists a
benchmark's flags. Each writes bench/out/NAME.json and NAME.md (``--out-dir``); at the end
bench/out/summary.md gathers this run's markdown. The exit code is 1 when a benchmark
failed or one of its checks did (``checks`` in its JSON).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import common

BENCHMARKS = ["reply", "load", "lag", "swap", "votes", "train", "memory"]


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Leading benchmark names, then the flags."""
    names = []
    while argv and not argv[0].startswith("-"):
        if argv[0] not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {argv[0]!r}; choose from {' '.join(BENCHMARKS)}")
        names.append(argv.pop(0))
    return names or list(BENCHMARKS), argv


def known(parser, argv: list[str]) -> tuple[list[str], set[str]]:
    """The part of ``argv`` that ``parser`` understands, and the flags it does not."""
    _, unknown = parser.parse_known_args(argv)
    rest, out = list(unknown), []
    for tok in argv:
        if rest and tok == rest[0]:
            rest.pop(0)
        else:
            out.append(tok)
    return out, {u.split("=", 1)[0] for u in unknown if u.startswith("-")}


def out_dir(argv: list[str]) -> Path:
    ns, _ = common.base_parser("x", None).parse_known_args(argv)
    return ns.out_dir


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    names, flags = split(argv)
    plans, unknown_to = {}, None
    for name in names:
        parser = importlib.import_module(f"bench.{name}").build_parser()
        plans[name], unknown = known(parser, flags)
        unknown_to = unknown if unknown_to is None else unknown_to & unknown
    if unknown_to:
        raise SystemExit(f"no benchmark among {' '.join(names)} takes {' '.join(sorted(unknown_to))}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))}
    results = []
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}", *plans[name]]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t0, started = time.perf_counter(), time.time()
        rc = subprocess.run(cmd, cwd=common.ROOT, env=env).returncode
        results.append((name, rc, time.perf_counter() - t0, started))
    return summarize(results, out_dir(flags))


def summarize(results: list[tuple[str, int, float, float]], out: Path) -> int:
    """bench/out/summary.md: this run's exit codes, then each markdown this run wrote."""
    overview = common.table(["benchmark", "exit (1: a check failed or it crashed)", "seconds"],
                            [[n, rc, round(s, 1)] for n, rc, s, _ in results])
    parts = ["# Benchmarks\n", overview, ""]
    for name, rc, _, started in results:
        md = out / f"{name}.md"
        if md.is_file() and md.stat().st_mtime >= started:
            parts += [md.read_text(encoding="utf-8"), ""]
        else:
            parts += [f"## {name}: no result (exit {rc})\n"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(parts), encoding="utf-8")
    print("\n" + overview)
    print(f"wrote {out / 'summary.md'}")
    return 0 if all(rc == 0 for _, rc, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
