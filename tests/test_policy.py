"""The serving policy with a tiny real model: recorded logprobs, batching, budget, busy."""

import asyncio
import math
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


@pytest.fixture(scope="module")
def torch_policy(tiny_model_dir):
    """The reference engine (transformers generate on torch), whose logprobs are exact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir),
               max_new_tokens=12, system_prompt="Be brief.", max_context_tokens=256, engine="torch")
    yield p
    p.close()


def test_the_default_engine_is_the_fast_one(shared_policy):
    assert type(shared_policy.engine).__name__ == "CT2Engine" and shared_policy.engine.lanes >= 1


async def test_logprobs_match_a_forward_pass(torch_policy):
    p = torch_policy
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


@pytest.fixture(scope="module")
def peaky_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its embedding (tied to the output layer) scaled up until the first
    reply token's most likely value has p between 0.2 and 0.7 at T = 0.7: a peaked
    distribution, so that the temperature visibly changes it and frequencies are measurable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("peaky")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = torch.tensor([tok.encode("hello there", add_special_tokens=False)])
    for scale in (4, 6, 8, 11, 15, 20, 27):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(scale)
            top = float(torch.softmax(model(input_ids=prompt).logits[0, -1] / 0.7, -1).max())
        if 0.2 <= top <= 0.7:
            break
    else:
        pytest.skip("no scale gives the tiny model a measurable peak")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_fast_engine_logprobs_are_its_own_sampling_distribution(peaky_model_dir, tmp_path):
    """The CTranslate2 engine's recorded logprob of a token is the probability it was drawn
    with: over thousands of one-token samples each token's frequency matches exp(logprob),
    every sample of a token records the same number, and that number is the tempered one
    (it differs from T = 1), close to the fp32 model's."""
    from collections import Counter

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bot.ct2_engine import CT2Engine

    model, tok = AutoModelForCausalLM.from_pretrained(peaky_model_dir), AutoTokenizer.from_pretrained(peaky_model_dir)
    T = 0.7
    engine = CT2Engine(model, tok, temperature=T, work_dir=tmp_path, lanes=1)
    prompt = tok.encode("hello there", add_special_tokens=False)
    samples = [s for _ in range(8) for s in engine.sample([prompt] * 500, 0, temperature=T, top_p=1.0,
                                                           max_new_tokens=1)]
    engine.close()
    recorded: dict[int, set] = {}
    for ids, logps in samples:
        recorded.setdefault(ids[0], set()).add(round(logps[0], 5))
    assert all(len(v) == 1 for v in recorded.values())           # one distribution, one number per token
    counts, n = Counter(ids[0] for ids, _ in samples), len(samples)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    fp32 = torch.log_softmax(logits / T, -1)
    untempered = torch.log_softmax(logits, -1)
    for token, c in counts.most_common(5):
        p = math.exp(next(iter(recorded[token])))
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(c / n - p) < 5 * sigma + 1e-3, (token, c / n, p)
        assert abs(math.log(p) - float(fp32[token])) < 0.1
    top = counts.most_common(1)[0][0]
    assert abs(next(iter(recorded[top])) - float(untempered[top])) > 0.1    # the temperature is applied


async def test_installing_a_version_after_close_raises_instead_of_waiting_forever(tmp_path, tiny_model_dir, store_for):
    from tests.trainer_helpers import tiny_config, trainer_config
    from trainer.learner import Learner
    from trainer.publish import publish

    cfg = tiny_config(tmp_path, tiny_model_dir, serving={"engine": "torch"})
    store = await store_for(cfg)
    cand = Learner(cfg, trainer_config(cfg)).candidate(None, seed=0)
    folder = await publish(store, cfg.versions_dir, version=1, parent=0, model=cand.model, kind=cand.kind, meta={},
                           metrics={"last_reply_id": 0})
    p = Policy.from_config(cfg)
    p.close()                             # its lanes are gone: an install queued now would never run
    with pytest.raises(RuntimeError, match="the policy is closed"):
        await asyncio.wait_for(p.install_version(1, folder, (await store.get_version(1)).sha256), 60)
    assert not p.is_loaded(1)
