"""The serving policy with a tiny real model: recorded logprobs, batching, budget, busy."""

import asyncio
import threading

import pytest
import torch

from bot.policy import Busy, Policy, Turn


def recompute_logprobs(model, prompt_ids, output_ids, temperature):
    """log softmax(logits / T) at each sampled token, by one forward pass over prompt + output."""
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    steps = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(output_ids)]
    logp = torch.log_softmax(steps / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(output_ids).unsqueeze(-1)).squeeze(-1)


async def test_logprobs_match_a_forward_pass(shared_policy):
    p = shared_policy
    prompts = [p.build_prompt([Turn("user", text)]) for text in ["hello there", "what is the weather like? " * 3]]
    gens = await p.generate_many(prompts)      # one batch, left padding on the shorter prompt
    for gen, prompt in zip(gens, prompts):
        assert gen.prompt_ids == prompt
        assert len(gen.output_ids) == len(gen.logprobs) >= 1
        assert gen.version == 0 and gen.temperature == p.temperature
        expected = recompute_logprobs(p.base, gen.prompt_ids, gen.output_ids, gen.temperature)
        torch.testing.assert_close(torch.tensor(gen.logprobs), expected, atol=1e-4, rtol=0)


async def test_output_stops_at_end_of_turn_or_budget(shared_policy):
    gens = await shared_policy.generate_many([shared_policy.build_prompt([Turn("user", "hi")])] * 6)
    eos = shared_policy.tokenizer.eos_token_id
    for g in gens:
        assert len(g.output_ids) <= shared_policy.max_new_tokens
        assert eos not in g.output_ids[:-1]          # nothing recorded past the end of turn


def test_prompt_keeps_newest_turns_within_budget(shared_policy):
    p = shared_policy
    turns = [Turn("user", f"message number {i} " * 5, "alice") for i in range(40)] + [Turn("user", "the newest", "bob")]
    ids = p.build_prompt(turns)
    assert len(ids) <= p.max_context_tokens
    text = p.tokenizer.decode(ids)
    assert "bob: the newest" in text and "message number 0 " not in text and "Be brief." in text


def test_a_huge_message_is_cut_to_the_budget_keeping_its_end(shared_policy):
    p = shared_policy
    ids = p.build_prompt([Turn("user", "blah " * 5000 + "THE QUESTION?")])
    assert len(ids) <= p.max_context_tokens
    assert "QUESTION?" in p.tokenizer.decode(ids)


async def test_full_queue_answers_busy_at_once(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir),
               max_new_tokens=8, queue_size=2, batch_size=1)
    release = threading.Event()
    try:
        prompt = p.build_prompt([Turn("user", "hi")])
        p._jobs.put(release.wait)         # hold the worker so the queue fills deterministically
        first = asyncio.ensure_future(p.generate_many([prompt, prompt]))
        await asyncio.sleep(0)            # the two are queued
        with pytest.raises(Busy):
            await p.generate_many([prompt])
        release.set()
        assert len(await first) == 2      # the waiting ones still complete
    finally:
        p.close()


async def test_event_loop_stays_free_while_generating(shared_policy):
    """A coroutine keeps ticking while a batch is generated in the worker thread."""
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    await shared_policy.generate_many([shared_policy.build_prompt([Turn("user", "hello")])] * 4)
    t.cancel()
    assert ticks > 10
