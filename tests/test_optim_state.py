"""AdamW state carried between versions (trainer/optim_state.py): exact continuation, refusals,
and two real rounds on the tiny model where the second continues the first's optimizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from bot import versions
from bot.models import sha256_file
from tests.trainer_helpers import tiny_config, trainer_config
from tests.test_trainer_learning import seed_preferences
from trainer.optim_state import OPTIMIZER_FILE, export_adam, import_adam, read_optimizer
from trainer.learner import Learner
from trainer.round import run_round


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)          # frozen parameters carry no state
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    return model, opt


def _step(model, opt, x):
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()


def test_a_restored_optimizer_continues_exactly_like_the_original():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    a, opt_a = _model_and_opt()
    for _ in range(3):
        _step(a, opt_a, x)
    flat = export_adam(a, opt_a)
    assert set(flat) == {f"{n}.{k}" for n in ("0.weight", "1.weight", "1.bias")
                         for k in ("exp_avg", "exp_avg_sq", "step")}
    assert float(flat["1.bias.step"]) == 3.0
    weights_after_3 = copy.deepcopy(a.state_dict())

    b, opt_b = _model_and_opt(seed=7)
    b.load_state_dict(weights_after_3)
    assert import_adam(b, opt_b, flat) == ""
    _step(a, opt_a, x)
    _step(b, opt_b, x)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)

    # the same weights with a fresh optimizer take another step: the state is what made b exact
    c, opt_c = _model_and_opt(seed=7)
    c.load_state_dict(weights_after_3)
    _step(c, opt_c, x)
    assert not torch.allclose(c[1].weight, a[1].weight)


def test_state_that_does_not_fit_is_refused_and_the_optimizer_stays_fresh():
    a, opt_a = _model_and_opt()
    _step(a, opt_a, torch.randn(2, 4))
    flat = export_adam(a, opt_a)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))   # other shapes
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    assert "0.weight" in import_adam(model, opt, flat) and not opt.state
    b, opt_b = _model_and_opt()
    missing = {k: v for k, v in flat.items() if not k.startswith("1.bias")}
    assert import_adam(b, opt_b, missing) == "no optimizer state for 1.bias" and not opt_b.state
    bad = {**flat, "1.bias.exp_avg_sq": torch.full_like(flat["1.bias.exp_avg_sq"], float("nan"))}
    assert "not finite" in import_adam(b, opt_b, bad) and not opt_b.state


def test_read_optimizer_checks_the_sha256(tmp_path):
    a, opt_a = _model_and_opt()
    _step(a, opt_a, torch.randn(2, 4))
    save_file(export_adam(a, opt_a), str(tmp_path / OPTIMIZER_FILE))
    sha = sha256_file(tmp_path / OPTIMIZER_FILE)
    state, why = read_optimizer(tmp_path, sha, a)
    assert why == "" and set(state) == set(export_adam(a, opt_a))
    assert read_optimizer(tmp_path, None, a) == (None, f"the version has no {OPTIMIZER_FILE}")
    assert read_optimizer(tmp_path, "0" * 64, a)[1] == f"{OPTIMIZER_FILE} does not match its sha256"
    (tmp_path / OPTIMIZER_FILE).unlink()
    assert read_optimizer(tmp_path, sha, a)[1] == f"{OPTIMIZER_FILE} is missing"


def test_an_optimizer_file_bigger_than_the_model_s_state_is_refused_unread(tmp_path):
    a, opt_a = _model_and_opt()
    _step(a, opt_a, torch.randn(2, 4))
    save_file(export_adam(a, opt_a), str(tmp_path / OPTIMIZER_FILE))
    limit = versions.max_optimizer_bytes(a)
    assert (tmp_path / OPTIMIZER_FILE).stat().st_size <= limit          # the real state fits its bound
    with open(tmp_path / OPTIMIZER_FILE, "wb") as f:                    # a sparse file one byte over it
        f.truncate(limit + 1)
    state, why = read_optimizer(tmp_path, sha256_file(tmp_path / OPTIMIZER_FILE), a)
    assert state is None and f"{OPTIMIZER_FILE} is {limit + 1:,} bytes" in why and "refusing it unread" in why


async def test_the_next_round_continues_the_parents_optimizer(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1, "keep_optimizer": True})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg, progress=False)
    learner.load()
    await seed_preferences(store, learner.base, learner.tokenizer, copies=1)

    r1 = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert r1.status == "published", r1.reason
    v1 = Path((await store.get_version(r1.version)).path)
    meta = json.loads((v1 / "meta.json").read_text())
    assert meta["optimizer_sha256"] == sha256_file(v1 / OPTIMIZER_FILE)
    trainable = learner.candidate(await store.get_version(r1.version), seed=0).model
    steps_v1 = read_optimizer(v1, meta["optimizer_sha256"], trainable)[0]
    first = next(k for k in steps_v1 if k.endswith(".step"))
    assert float(steps_v1[first]) == meta["metrics"]["steps"] > 0

    r2 = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert r2.status == "published", r2.reason
    v2 = Path((await store.get_version(r2.version)).path)
    meta2 = json.loads((v2 / "meta.json").read_text())
    assert meta2["metrics"]["start"] == f"continuing v{r1.version} (lora), its optimizer state"
    steps_v2 = read_optimizer(v2, meta2["optimizer_sha256"], trainable)[0]
    assert float(steps_v2[first]) == float(steps_v1[first]) + meta2["metrics"]["steps"]

    # a tampered optimizer file only means a fresh optimizer; the round still publishes
    (v2 / OPTIMIZER_FILE).write_bytes(b"not safetensors")
    r3 = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert r3.status == "published", r3.reason
    meta3 = json.loads((Path((await store.get_version(r3.version)).path) / "meta.json").read_text())
    assert meta3["metrics"]["start"].endswith(f"a fresh optimizer ({OPTIMIZER_FILE} does not match its sha256)")

