"""The reference serving engine: transformers ``generate`` on the torch model, one batch at a time.

It is the fallback for any model the fast engine (``bot/ct2_engine.py``) cannot run, and
what tests compare against. Versions live beside the base: a LoRA version is a named peft
adapter on one shared PeftModel, a full version a second model. Switching adapters is not
thread-safe, so this engine runs in one lane (one worker thread).

Logprobs: for every sampled token, log softmax(logits / T) at that token: the tempered
distribution the sample came from, before top-p truncation.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from bot import versions
from bot.policy_types import VersionError

log = logging.getLogger(__name__)

OnStep = Callable[[int, list[int]], None]    # (row in the batch, the row's sampled ids so far)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch for ``generate``: (input_ids, attention_mask), [B, P]."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    return input_ids, attention


class _StepHook(LogitsProcessor):
    """Sees the sequences at every decoding step and reports each row's new tokens."""

    def __init__(self, width: int, on_step: OnStep):
        self.width, self.on_step = width, on_step

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.width:          # the first call comes before any sampled token
            for row, ids in enumerate(input_ids[:, self.width:].tolist()):
                self.on_step(row, ids)
        return scores


@torch.no_grad()
def sample_batch(model, tok, prompts: list[list[int]], *, temperature: float, top_p: float, max_new_tokens: int,
                 on_step: OnStep | None = None) -> list[tuple[list[int], list[float]]]:
    """One reply per prompt from ``model``: (sampled ids, end-of-turn included when sampled;
    their logprobs at ``temperature``, over the whole vocabulary as the trainer computes them)."""
    input_ids, attention = left_pad(prompts, tok.pad_token_id)
    width = input_ids.shape[1]
    gen_config = GenerationConfig(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, output_logits=True,
        return_dict_in_generate=True)
    hooks = LogitsProcessorList([_StepHook(width, on_step)] if on_step else [])
    out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_config,
                         logits_processor=hooks)
    new = out.sequences[:, width:]                                        # [B, steps]
    # one step at a time: a [B, steps, V] float copy would be ~0.4 GB for 32 replies
    token_logp = torch.stack([                                            # [B, steps]
        torch.log_softmax(step.float() / temperature, dim=-1).gather(-1, new[:, i:i + 1]).squeeze(-1)
        for i, step in enumerate(out.logits)], dim=1)
    results = []
    for i in range(len(prompts)):
        ids = new[i].tolist()
        n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
        results.append((ids[:n], token_logp[i, :n].tolist()))
    return results


class TorchEngine:
    lanes = 1                                        # PeftModel adapter switching is not thread-safe

    def __init__(self, base, tokenizer):
        self.base = base.eval()
        self.model = self.base                       # becomes a PeftModel once a LoRA version is installed
        self.tokenizer = tokenizer
        self._kinds: dict[int, str] = {0: "base"}    # version → "base" | "lora" | "full"
        self._full_models: dict[int, Any] = {}

    # -- sampling ---------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], version: int, *, temperature: float, top_p: float,
               max_new_tokens: int, on_step: OnStep | None = None) -> list[tuple[list[int], list[float]]]:
        """One reply per prompt: (sampled ids, end-of-turn included when sampled; their logprobs)."""
        return sample_batch(self._model_for(version), self.tokenizer, prompts, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, on_step=on_step)

    def _model_for(self, version: int):
        kind = self._kinds.get(version)
        if kind is None:
            raise VersionError(f"version {version} is not loaded")
        if kind == "full":
            return self._full_models[version]
        if kind == "lora":
            self.model.set_adapter(f"v{version}")
            self.model.enable_adapter_layers()
            return self.model
        if self.model is not self.base:
            self.model.disable_adapter_layers()
        return self.model

    # -- versions ---------------------------------------------------------------

    def install(self, version: int, files: versions.VersionFiles) -> None:
        label = f"v{version}"                       # the adapter's name; errors name the folder
        if files.kind == "full":
            model = type(self.base)(self.base.config).to(next(self.base.parameters()).dtype)
            versions.load_full_weights(model, files.state, str(files.path))
            self._full_models[version] = model.eval()
        else:
            self.model = versions.add_adapter(self.model, files, label, str(files.path)).eval()
        self._kinds[version] = files.kind

    def seed(self, value: int) -> None:
        torch.manual_seed(value)

    def close(self) -> None:
        """Nothing to release: the torch models go with the engine."""

    def forget(self, version: int) -> None:
        kind = self._kinds.pop(version, None)
        if kind == "full":
            self._full_models.pop(version, None)
        elif kind == "lora":
            self.model.delete_adapter(f"v{version}")
