"""The layout rules docs/ARCHITECTURE.md promises, checked on the source itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
MODEL_STACK = ("torch", "transformers", "peft", "safetensors")
CHAT_SDKS = ("discord", "slack_bolt", "slack_sdk")


def python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (at any depth, lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from its first statement after the docstring to its end."""
    body = fn.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(
            body[0].value.value, str):
        body = body[1:]
    return fn.end_lineno - body[0].lineno + 1 if body else 0


def test_the_chat_core_loads_no_model_stack():
    code = ("import sys, bot.chat, bot.events, bot.rewards, bot.store, bot.policy_types; "
            f"print(','.join(m for m in {MODEL_STACK!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the chat core imported {out.stdout.strip()}"


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in python_files("bot", "trainer"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(node) > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({body_lines(node)} lines)")
    assert long == []


@pytest.mark.parametrize("path", python_files("bot", "trainer"), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_one_way(path: Path):
    rel = path.relative_to(ROOT).as_posix()
    mods = imported_modules(path)
    tops = {m.split(".")[0] for m in mods}
    if rel.startswith("bot/"):
        assert "trainer" not in tops, "bot never imports the trainer"
    if not rel.startswith("bot/adapters/"):
        assert not tops & set(CHAT_SDKS), "only bot/adapters/ imports a chat SDK"
    if rel.startswith("trainer/") and not rel.startswith("trainer/simulate/"):
        assert not {m for m in mods if m == "bot.policy" or m.startswith("bot.policy.")}, \
            "the trainer loads versions through bot.versions, not the serving policy"
    if rel.startswith("bot/adapters/"):
        source = path.read_text()
        for private in ("core.store", "core.rewards", "core.policy"):
            assert private not in source, f"adapters talk to the chat core only, not {private}"
