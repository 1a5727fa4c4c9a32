"""The loopback fake Slack (tests/fakes/slack_server.py) against the real slack-bolt AsyncApp in Socket Mode."""

import asyncio

import pytest
import pytest_asyncio
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from tests.fakes.slack_server import FakeSlack, FakeSlackTimeout


@pytest_asyncio.fixture
async def fake():
    async with FakeSlack() as f:
        yield f


@pytest_asyncio.fixture
async def bolt(fake):
    """A plain AsyncApp connected to the fake over Socket Mode; yields (app, handler).

    Listeners may be registered after connecting: bolt looks them up per request.
    """
    client = AsyncWebClient(token=fake.bot_token, base_url=fake.api_url)
    app = AsyncApp(client=client)
    handler = AsyncSocketModeHandler(app, app_token=fake.app_token)
    await handler.connect_async()
    await fake.wait_connected(timeout=10)
    try:
        yield app, handler
    finally:
        await handler.close_async()


async def next_item(queue: asyncio.Queue, timeout: float = 5):
    return await asyncio.wait_for(queue.get(), timeout)


async def test_connects_with_app_token(fake, bolt):
    assert fake.connected
    assert fake.connection_count == 1
    (open_call,) = fake.calls_to("apps.connections.open")
    assert open_call.token == fake.app_token
    assert open_call.response == {"ok": True, "url": fake.ws_url}


async def test_app_mention_threaded_reply_and_both_events_delivered(fake, bolt):
    app, _ = bolt
    mentions: asyncio.Queue = asyncio.Queue()
    messages: asyncio.Queue = asyncio.Queue()

    @app.event("app_mention")
    async def on_mention(event, say):
        await mentions.put(event)
        await say(text=f"hi <@{event['user']}>", thread_ts=event["ts"])

    @app.event("message")
    async def on_message(event):
        await messages.put(event)

    ts = await fake.user_message("C1", "U1", "hello bot", mention_bot=True)

    reply = await fake.wait_bot_message("C1", thread_ts=ts)
    assert reply["text"] == "hi <@U1>"
    assert reply["user"] == fake.bot_user_id and reply["bot_id"] == fake.bot_id

    mention = await next_item(mentions)
    assert mention["type"] == "app_mention"
    assert mention["text"] == "<@UBOT> hello bot"
    assert mention["ts"] == ts and mention["channel"] == "C1" and mention["user"] == "U1"

    # Real Slack also sends the plain message event for a mention; bolt delivers both.
    msg = await next_item(messages)
    assert msg["ts"] == ts and msg["channel_type"] == "channel" and msg["text"] == "<@UBOT> hello bot"

    # The fake echoes the bot's own reply as a message event (as Slack does);
    # bolt's IgnoringSelfEvents acks it but never calls the listener.
    echo = [e for e in fake.envelopes if e.event and e.event.get("bot_id") == fake.bot_id]
    assert len(echo) == 1
    assert await fake.wait_ack(echo[0]) == {}
    await asyncio.sleep(0.2)
    assert messages.empty()

    # every envelope was acked.  bolt caches auth.test, but the two envelopes of
    # a mention are dispatched concurrently, so both may miss the cache.
    for env in fake.envelopes:
        assert await fake.wait_ack(env) == {}
    assert 1 <= len(fake.calls_to("auth.test")) <= 2
    assert fake.unknown_calls == []


async def test_mention_in_dm_sends_only_message_event(fake, bolt):
    app, _ = bolt
    seen: asyncio.Queue = asyncio.Queue()

    @app.event("app_mention")
    async def on_mention(event):
        await seen.put(("mention", event))

    @app.event("message")
    async def on_message(event, say):
        await seen.put(("message", event))
        await say("dm reply")

    ts = await fake.user_message("D1", "U1", "psst", mention_bot=True)
    kind, event = await next_item(seen)
    assert kind == "message" and event["channel_type"] == "im" and event["ts"] == ts
    assert (await fake.wait_bot_message("D1"))["text"] == "dm reply"
    assert [e.event["type"] for e in fake.envelopes if e.event][:1] == ["message"]
    assert not any(e.event and e.event["type"] == "app_mention" for e in fake.envelopes)


async def test_other_bot_message_subtype(fake, bolt):
    app, _ = bolt
    events: asyncio.Queue = asyncio.Queue()
    plain: asyncio.Queue = asyncio.Queue()

    @app.event({"type": "message", "subtype": None})
    async def on_plain(event):
        await plain.put(event)

    @app.event("message")
    async def on_any_message(event):
        await events.put(event)

    await fake.user_message("C2", "UOTHER", "beep", bot=True)
    await fake.user_message("C2", "U2", "human")
    # Only the first matching listener runs per request:
    # the bot_message goes to the catch-all, the plain message to on_plain.
    ev = await next_item(events)
    assert ev["subtype"] == "bot_message" and ev["bot_id"] == "BUOTHER"
    human = await next_item(plain)
    assert human["user"] == "U2" and "subtype" not in human
    assert events.empty()


async def test_reactions_reach_handlers(fake, bolt):
    app, _ = bolt
    added: asyncio.Queue = asyncio.Queue()
    removed: asyncio.Queue = asyncio.Queue()

    @app.event("reaction_added")
    async def on_added(event, context):
        await added.put((event, context.user_id, context.channel_id))

    @app.event("reaction_removed")
    async def on_removed(event):
        await removed.put(event)

    @app.event("message")
    async def ignore_messages():
        pass

    ts = await fake.user_message("C1", "U2", "a message")
    env = await fake.react("C1", ts, "U1", "thumbsup")
    event, user_id, channel_id = await next_item(added)
    assert event["type"] == "reaction_added"
    assert event["user"] == "U1" and event["reaction"] == "thumbsup"
    assert event["item"] == {"type": "message", "channel": "C1", "ts": ts}
    assert event["item_user"] == "U2"
    assert (user_id, channel_id) == ("U1", "C1")
    assert await fake.wait_ack(env) == {}
    assert fake.get_message("C1", ts)["reactions"] == [{"name": "thumbsup", "users": ["U1"], "count": 1}]

    await fake.react("C1", ts, "U1", "thumbsup", add=False)
    event = await next_item(removed)
    assert event["type"] == "reaction_removed" and event["reaction"] == "thumbsup"
    assert event["item"]["ts"] == ts and event["user"] == "U1"
    assert "reactions" not in fake.get_message("C1", ts)

    # The bot's own reaction: recorded, echoed as reaction_added by UBOT, which bolt drops.
    await app.client.reactions_add(channel="C1", timestamp=ts, name="eyes")
    assert await fake.wait_bot_reaction("C1", ts, "eyes")
    own = [e for e in fake.envelopes if e.event and e.event["type"] == "reaction_added" and e.event["user"] == "UBOT"]
    assert len(own) == 1 and own[0].event["reaction"] == "eyes"
    await fake.wait_ack(own[0])
    await asyncio.sleep(0.2)
    assert added.empty()
    with pytest.raises(SlackApiError) as err:
        await app.client.reactions_add(channel="C1", timestamp=ts, name="eyes")
    assert err.value.response["error"] == "already_reacted"
    await app.client.reactions_remove(channel="C1", timestamp=ts, name="eyes")
    assert fake.bot_reactions == [{"channel": "C1", "ts": ts, "name": "eyes", "removed": True}]


async def test_slash_command_ack_and_respond(fake, bolt):
    app, _ = bolt

    @app.command("/teach")
    async def on_teach(ack, respond, command):
        await ack(f"learning: {command['text']}")
        await respond(text=f"done by {command['user_name']}", response_type="ephemeral")

    record = await fake.slash("/teach", "be nice", "UADMIN", "C1")
    assert await fake.wait_ack(record) == {"text": "learning: be nice"}
    assert record.ack_text == "learning: be nice"
    response = await fake.wait_response(record)
    assert response["text"] == "done by admin"
    assert response["response_type"] == "ephemeral"


async def test_slash_command_bare_ack(fake, bolt):
    app, _ = bolt

    @app.command("/quiet")
    async def on_quiet(ack):
        await ack()

    record = await fake.slash("/quiet", "", "U1", "D1")
    assert await fake.wait_ack(record) == {}
    assert record.payload["channel_name"] == "directmessage"
    assert record.payload["response_url"] == f"{fake.base_url}/respond/{record.envelope_id}"


async def test_unhandled_event_is_never_acked(fake, bolt):
    """Gotcha: bolt answers 404 for an event no listener matches, and the
    Socket Mode adapter then sends no ack at all (real Slack would retry)."""
    app, _ = bolt

    @app.event("reaction_added")
    async def on_added():
        pass

    ts = await fake.user_message("C1", "U1", "nobody listens to messages")
    (msg_env,) = [e for e in fake.envelopes if e.event and e.event.get("ts") == ts]
    handled = await fake.react("C1", ts, "U2", "wave")
    await fake.wait_ack(handled)
    with pytest.raises(FakeSlackTimeout):
        await fake.wait_ack(msg_env, timeout=0.5)


async def test_conversations_replies_and_history(fake, bolt):
    app, _ = bolt

    @app.event("message")
    async def ignore():
        pass

    parent = await fake.user_message("C1", "U1", "parent")
    await app.client.chat_postMessage(channel="C1", thread_ts=parent, text="bot reply")
    reply = await fake.user_message("C1", "U2", "human reply", thread_ts=parent)
    await fake.user_message("C1", "U2", "unrelated")

    resp = await app.client.conversations_replies(channel="C1", ts=parent)
    texts = [m["text"] for m in resp["messages"]]
    assert texts == ["parent", "bot reply", "human reply"]
    assert resp["messages"][0]["reply_count"] == 2
    assert resp["messages"][1]["bot_id"] == fake.bot_id
    assert resp["messages"][2]["thread_ts"] == parent and resp["messages"][2]["ts"] == reply

    # a reply's own ts gives just that reply
    only = await app.client.conversations_replies(channel="C1", ts=reply)
    assert [m["text"] for m in only["messages"]] == ["human reply"]

    history = await app.client.conversations_history(channel="C1")
    assert [m["text"] for m in history["messages"]] == ["unrelated", "parent"]

    with pytest.raises(SlackApiError) as err:
        await app.client.conversations_replies(channel="C1", ts="1.000000")
    assert err.value.response["error"] == "thread_not_found"


async def test_misc_web_api(fake):
    client = fake.make_client()
    user = (await client.users_info(user="UADMIN"))["user"]
    assert user["id"] == "UADMIN" and user["is_admin"] is True and user["is_bot"] is False
    assert (await client.users_info(user="U1"))["user"]["is_admin"] is False
    assert (await client.users_info(user="UBOT"))["user"]["is_bot"] is True
    with pytest.raises(SlackApiError) as err:
        await client.users_info(user="UNOPE")
    assert err.value.response["error"] == "user_not_found"

    eph = await client.chat_postEphemeral(channel="C1", user="U1", text="psst")
    assert eph["ok"] and fake.ephemerals[0]["text"] == "psst"

    with pytest.raises(SlackApiError) as err:
        await client.api_call("chat.frobnicate", json={"x": 1})
    assert err.value.response["error"] == "unknown_method"
    assert [c.method for c in fake.unknown_calls] == ["chat.frobnicate"]

    # args via query string and form body work too
    r = await client.api_call("users.info", http_verb="GET", params={"user": "U2"})
    assert r["user"]["name"] == "bob"
    r = await client.api_call("users.info", data={"user": "U1"})
    assert r["user"]["name"] == "alice"

    # ts values increase; no socket needed for Web API calls (echo is skipped)
    a = await client.chat_postMessage(channel="C2", text="one")
    b = await client.chat_postMessage(channel="C2", text="two")
    assert float(a["ts"]) < float(b["ts"])
    assert a["message"]["text"] == "one" and a["channel"] == "C2"

    # posting to a user id lands in the DM with that user
    assert (await client.chat_postMessage(channel="U1", text="dm"))["channel"] == "D1"
    assert (await client.chat_postMessage(channel="U2", text="dm"))["channel"] == "DU2"
    with pytest.raises(SlackApiError) as err:
        await client.chat_postMessage(channel="C404", text="x")
    assert err.value.response["error"] == "channel_not_found"

    with pytest.raises(SlackApiError) as err:
        await AsyncWebClient(token="xoxb-wrong", base_url=fake.api_url).auth_test()
    assert err.value.response["error"] == "invalid_auth"


async def test_rate_limit_is_retried_by_retry_handler(fake):
    fake.rate_limit("chat.postMessage", times=1, retry_after=1)
    plain = fake.make_client()
    with pytest.raises(SlackApiError) as err:
        await plain.chat_postMessage(channel="C1", text="no retry")
    assert err.value.response.status_code == 429
    assert err.value.response["error"] == "ratelimited"
    assert err.value.response.headers["Retry-After"] == "1"

    fake.rate_limit("chat.postMessage", times=1, retry_after=1)
    retrying = fake.make_client(retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)])
    resp = await retrying.chat_postMessage(channel="C1", text="with retry")
    assert resp["ok"]
    statuses = [c.status for c in fake.calls_to("chat.postMessage")]
    assert statuses == [429, 429, 200]
    assert [m["text"] for m in fake.bot_messages] == ["with retry"]


async def test_reconnect_after_disconnect_message(fake, bolt):
    app, _ = bolt
    got: asyncio.Queue = asyncio.Queue()

    @app.event("message")
    async def on_message(event):
        await got.put(event)

    await fake.send_disconnect()
    await fake.wait_connected(count=2)
    assert len(fake.calls_to("apps.connections.open")) == 2
    ts = await fake.user_message("C2", "U1", "still there?")
    assert (await next_item(got))["ts"] == ts


async def test_files_upload_v2_and_conversations_open(fake, bolt):
    """slack_sdk's files_upload_v2 against the fake: its three steps, the share, the echo, the errors."""
    app, _ = bolt
    echoes: asyncio.Queue = asyncio.Queue()

    @app.event("message")
    async def on_message(event):
        await echoes.put(event)

    client = fake.make_client()
    opened = await client.conversations_open(users="U2")
    assert opened["channel"] == {"id": "DU2"} and "already_open" not in opened.data
    again = await client.conversations_open(users="U2", return_im=True)
    assert again["already_open"] is True and again["channel"]["is_im"] and again["channel"]["user"] == "U2"
    assert (await client.conversations_open(users="U1"))["channel"]["id"] == "D1"
    for kwargs, error in [({}, "users_list_not_supplied"), ({"users": "UNOPE"}, "user_not_found"),
                          ({"channel": "C1"}, "channel_not_found")]:
        with pytest.raises(SlackApiError) as err:
            await client.api_call("conversations.open", params=kwargs)      # the SDK itself refuses no args
        assert err.value.response["error"] == error

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    done = await client.files_upload_v2(channel="DU2", file=png, filename="chart.png", title="A chart",
                                        alt_txt="bars")
    assert [c.method for c in fake.calls[-2:]] == ["files.getUploadURLExternal", "files.completeUploadExternal"]
    assert fake.calls[-2].args["length"] == str(len(png)) and done["file"]["title"] == "A chart"
    (shared,) = fake.shared_files
    assert (shared["channel"], shared["filename"], shared["title"], shared["data"]) == ("DU2", "chart.png", "A chart", png)
    record = fake.files[shared["file_id"]]
    assert record["completed"] and record["channels"] == ["DU2"] and record["alt_txt"] == "bars"
    (msg,) = fake.messages["DU2"]
    assert msg["subtype"] == "file_share" and msg["user"] == fake.bot_user_id and msg["files"][0]["mimetype"] == "image/png"
    assert fake.bot_messages == []                      # only chat.postMessage lands there

    # no channel: the file is the bot's alone, shared nowhere; a thread reply; a user id in channels
    await client.files_upload_v2(content="private", filename="p.txt")
    assert fake.files["F00000002"]["completed"] and fake.files["F00000002"]["channels"] == []
    parent = await fake.user_message("C1", "U1", "thread me")
    await client.files_upload_v2(channel="C1", content=b"x", filename="x.bin", thread_ts=parent, initial_comment="hi")
    assert fake.files_shared_to("C1")[0]["thread_ts"] == parent and fake.thread("C1", parent)[-1]["text"] == "hi"
    await client.files_upload_v2(channels=["U1"], content=b"y", filename="y.bin")
    assert fake.files_shared_to("D1")[0]["data"] == b"y"
    assert len(fake.shared_files) == 3

    # errors: an unknown channel, a file never uploaded or completed twice, a failed upload POST, a missing scope
    with pytest.raises(SlackApiError) as err:
        await client.files_upload_v2(channel="C404", content=b"z", filename="z")
    assert err.value.response["error"] == "channel_not_found"
    fresh = await client.files_getUploadURLExternal(filename="n.png", length=3)
    assert fresh["upload_url"].startswith(fake.base_url + "/upload/v1/")
    for file_id in (fresh["file_id"], shared["file_id"], "FNOPE"):
        with pytest.raises(SlackApiError) as err:
            await client.files_completeUploadExternal(files=[{"id": file_id}], channel_id="C1")
        assert err.value.response["error"] == "file_not_found"
    fake.fail_uploads(status=500, times=1)
    with pytest.raises(SlackRequestError, match="status: 500"):
        await client.files_upload_v2(channel="C1", content=b"z", filename="z")
    fake.scopes = "chat:write,users:read"
    for call in (client.files_getUploadURLExternal(filename="a", length=1), client.conversations_open(users="U1")):
        with pytest.raises(SlackApiError) as err:
            await call
        assert err.value.response["error"] == "missing_scope" and err.value.response["provided"] == fake.scopes
    assert [c.response["needed"] for c in fake.calls[-2:]] == ["files:write", "im:write"]
    assert len(fake.shared_files) == 3

    # each share was echoed as a file_share message event (which bolt drops: the bot's own)
    echoed = fake.envelopes_for(lambda e: e.get("subtype") == "file_share")
    assert [e.event["channel"] for e in echoed] == ["DU2", "C1", "D1"]
    assert [e.event["files"][0]["id"] for e in echoed] == [shared["file_id"], "F00000003", "F00000004"]
    for env in fake.envelopes:
        await fake.wait_ack(env)
    assert (await next_item(echoes))["ts"] == parent and echoes.empty()
