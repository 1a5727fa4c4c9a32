"""Benchmark: default model conversion time, load time and reply speed.

Usage:
    .venv/bin/python bench/load_time.py [--cache-dir DIR] [--fresh] [--new-tokens 48] [--threads N]

``--fresh`` converts into a throw-away cache dir, so the one-time
download + conversion is always measured.  Results are printed and saved to
``bench/out/load_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bot import process  # noqa: E402

PROMPT = "Hello, who are you?"


def _default_cache() -> Path:
    env = os.environ.get("REACTLEARN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "reactlearn"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=_default_cache())
    ap.add_argument("--fresh", action="store_true", help="convert into a temporary cache dir")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "load_time.json")
    args = ap.parse_args()
    process.setup_logging("INFO")

    t0 = time.perf_counter()
    import torch

    from bot import models

    import_s = time.perf_counter() - t0
    process.set_torch_threads(args.threads)

    tmp_cache = Path(tempfile.mkdtemp(prefix="reactlearn-bench-")) if args.fresh else None
    cache_dir = tmp_cache or args.cache_dir
    try:
        target = cache_dir / models.DEFAULT_MODEL_DIRNAME
        had_model = (target / models.MARKER_NAME).is_file()
        t0 = time.perf_counter()
        models.ensure_default_model(cache_dir)
        ensure_s = time.perf_counter() - t0
        conversion_s = None if had_model else ensure_s

        t0 = time.perf_counter()
        model, tok = models.load_model_and_tokenizer(models.DEFAULT_MODEL, cache_dir)
        load_s = time.perf_counter() - t0

        inputs = tok.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        n_prompt = int(inputs["input_ids"].shape[1])
        replies = []
        for label in ("first", "second"):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            dt = time.perf_counter() - t0
            new = out[0, n_prompt:]
            replies.append(
                {
                    "run": label,
                    "new_tokens": int(new.shape[0]),
                    "seconds": round(dt, 3),
                    "tokens_per_s": round(int(new.shape[0]) / dt, 2),
                    "text": tok.decode(new, skip_special_tokens=True),
                }
            )
    finally:
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)

    result = {
        "model": models.DEFAULT_MODEL_DIRNAME,
        "cache_dir": str(cache_dir),
        "import_s": round(import_s, 3),
        "converted": conversion_s is not None,
        "conversion_s": None if conversion_s is None else round(conversion_s, 3),
        "ensure_s": round(ensure_s, 4),
        "load_s": round(load_s, 3),
        "prompt_tokens": n_prompt,
        "replies": replies,
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    models.atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
