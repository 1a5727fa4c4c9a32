"""Emoji → reward and how votes add up, as a table of cases."""

import pytest

from bot.rewards import RewardMap, canonical, reply_reward, user_value

UP, DOWN = "👍", "👎"


@pytest.mark.parametrize("emoji, expected", [
    (UP, 1.0), (DOWN, -1.0),
    ("👍🏽", 1.0), ("👎🏿", -1.0),                 # skin tones
    ("+1", 1.0), ("-1", -1.0), ("thumbsup", 1.0), ("thumbsdown", -1.0),
    ("+1::skin-tone-3", 1.0), (":thumbsdown:", -1.0),   # Slack spellings
    ("👍\ufe0f", 1.0),                           # variation selector
    ("🎉", None), ("heart", None), ("", None),    # not voting emoji by default
])
def test_default_map(emoji, expected):
    assert RewardMap().value(emoji) == expected


def test_configured_map_accepts_slack_names_as_keys():
    m = RewardMap({"heart": 0.5, UP: 1, "-1": -1})
    assert m.value("❤") == 0.5 and m.value("heart") == 0.5
    assert m.value("thumbsdown") == -1.0
    assert m.seed_emoji == [UP, DOWN]


@pytest.mark.parametrize("values, expected", [
    ([], 0.0), ([1.0], 1.0), ([1.0, -1.0], 0.0), ([1.0, 0.5], 1.0), ([-1.0, -0.5], -1.0), ([0.5, -0.25], 0.25),
])
def test_user_value_is_clipped_sum(values, expected):
    assert user_value(values) == pytest.approx(expected)


@pytest.mark.parametrize("votes, expected", [
    ([], None),
    ([("a", UP, 1.0)], 1.0),
    ([("a", UP, 1.0), ("a", DOWN, -1.0)], 0.0),                 # both emoji from one user cancel
    ([("a", UP, 1.0), ("b", DOWN, -1.0), ("c", UP, 1.0)], 1 / 3),
    ([("a", UP, 1.0), ("a", UP, 1.0)], 1.0),                    # same emoji twice counts once
])
def test_reply_reward_is_mean_of_users(votes, expected):
    got = reply_reward(votes)
    assert got == (None if expected is None else pytest.approx(expected))


def test_canonical_is_idempotent():
    for e in ["👍🏻", "+1", "thumbsdown", "🎉", "custom_emoji"]:
        assert canonical(canonical(e)) == canonical(e)
