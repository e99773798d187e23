"""lean.store on PostgreSQL where it differs from one SQLite file: several instances on one
database (start-up, turns, a conversation's owner, a conversation and a Responses chain
going on on another instance), a connection the server drops, a URL's password kept out
of sight, and a migration step appended as plain SQL (that one on both databases)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import msgspec
import openai
import pytest

import lean.store_pg
import lean.store_sqlite
from lean.messages import MIGRATIONS, SCHEMA_VERSION
from lean.store import Store, StoreWriteError
from tests.fakes import FakeOpenAI, text_stream
from tests.store_targets import ADMIN_URL, PgServer, PgTarget, Target
from tests.support import lean_config, running


@pytest.fixture
def pg(pg_server: PgServer) -> Iterator[PgTarget]:
    if pg_server.skip:
        pytest.skip(pg_server.skip)
    pg_server.clean()
    yield PgTarget(pg_server.url)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


async def ask(store: Store, cid: str) -> int:
    return await store.begin_turn(conversation_id=cid, scene="chat", user_content="q")


async def test_instances_starting_together_on_an_empty_database_do_not_race(
    pg: PgTarget,
) -> None:
    stores = [Store(pg.where) for _ in range(6)]
    await asyncio.gather(*(s.open() for s in stores))  # each migrates under the advisory lock
    try:
        assert pg.sql("SELECT version FROM lean_schema") == [(SCHEMA_VERSION,)]
        assert pg.sql("SELECT count(*) FROM messages") == [(0,)]
        assert await ask(stores[0], "a") == 1
        assert await ask(stores[5], "a") == 2  # one table, seen by every instance
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_two_instances_never_give_a_conversation_the_same_turn(pg: PgTarget) -> None:
    one, two = Store(pg.where), Store(pg.where)
    await one.open()
    await two.open()
    try:
        turns = await asyncio.gather(
            *(ask(store, "shared") for _ in range(15) for store in (one, two))
        )
        assert sorted(turns) == list(range(1, 31))
        rows = await one.messages("shared", limit=100)
        assert [m.turn for m in rows] == list(range(1, 31))
    finally:
        await one.close()
        await two.close()


async def test_two_instances_give_a_new_conversation_to_one_client_only(pg: PgTarget) -> None:
    # The owner check and the turn's allocation are one step under the conversation's lock:
    # two clients racing to open the same conversation on two instances, one wins it whole.
    one, two = Store(pg.where), Store(pg.where)
    await one.open()
    await two.open()
    try:
        for cid in ("r1", "r2", "r3", "r4"):
            turns = await asyncio.gather(
                *(
                    store.begin_turn(
                        conversation_id=cid, scene="chat", user_content="q", client=client
                    )
                    for _ in range(3)
                    for store, client in ((one, "x"), (two, "y"))
                )
            )
            won = [t for t in turns if t]
            assert sorted(won) == [1, 2, 3] and turns.count(0) == 3
            rows = pg.sql("SELECT DISTINCT client FROM messages WHERE conversation_id = ?", (cid,))
            [(owner,)] = rows  # one owner, whose three turns these are
            assert await one.conversation_exists(cid, owner)
            assert not await two.conversation_exists(cid, "y" if owner == "x" else "x")
    finally:
        await one.close()
        await two.close()


async def test_a_connection_the_server_drops_fails_a_batch_then_the_store_reconnects(
    pg: PgTarget,
) -> None:
    store = Store(pg.where)
    await store.open()
    try:
        assert await ask(store, "a") == 1
        killed = pg.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'lean' AND datname = current_database()"
        )
        assert len(killed) == 2  # the writer's connection and the reader's
        with pytest.raises(StoreWriteError):
            await ask(store, "a")  # its batch went with the connection
        assert not store.writable
        async with asyncio.timeout(5):
            while not store.writable:  # noqa: ASYNC110 - the probe reconnects by itself
                await asyncio.sleep(0.02)
        assert await ask(store, "a") == 2
        assert [m.turn for m in await store.messages("a")] == [1, 2]  # the reader reconnected
    finally:
        await store.close()


SCENE = "[scene.chat]\nmodel = default\ntemplate = {message}\nhistory_turns = 5\n"


async def test_a_conversation_started_on_one_instance_goes_on_on_another(
    pg: PgTarget, fake: FakeOpenAI
) -> None:
    config = lean_config(fake.base_url, store=f"url = {pg.where}", extra=SCENE)
    ndjson = {"Accept": "application/x-ndjson"}
    async with running(config) as a, running(config) as b, aiohttp.ClientSession() as http:
        fake.push(text_stream("Paris."))
        async with http.post(
            a.url + "/v1/scenes/chat/stream", json={"message": "Capital of France?"}, headers=ndjson
        ) as resp:
            events = [msgspec.json.decode(line) async for line in resp.content if line.strip()]
        done, cid = events[-1], events[0]["conversationId"]
        assert (done["type"], done["saved"]) == ("done", True)  # committed before `done`
        fake.push(text_stream("Lyon."))
        body = {"message": "And the second city?", "conversationId": cid}
        async with http.post(b.url + "/v1/scenes/chat/stream", json=body, headers=ndjson) as resp:
            events = [msgspec.json.decode(line) async for line in resp.content if line.strip()]
        assert events[-1]["saved"] is True
        sent = fake.requests[-1].body["messages"]  # B read A's turn as history
        history = [m["content"] for m in sent][-3:]
        assert history == ["Capital of France?", "Paris.", "And the second city?"]
        async with http.get(f"{a.url}/v1/conversations/{cid}/messages") as resp:
            rows = (await resp.json())["messages"]
        assert [(r["turn"], r["role"], r["content"]) for r in rows] == [
            (1, "user", "Capital of France?"),
            (1, "assistant", "Paris."),
            (2, "user", "And the second city?"),
            (2, "assistant", "Lyon."),
        ]


async def test_a_response_chain_saved_on_one_instance_goes_on_on_another_for_its_client(
    pg: PgTarget, fake: FakeOpenAI
) -> None:
    environ = {"LEAN_TOKENS": "operator", "APP_TOKENS": "app-token"}
    config = lean_config(
        fake.base_url,
        store=f"url = {pg.where}",
        extra="[client.app]\ntoken_env = APP_TOKENS\n",
        environ=environ,
    )
    async with running(config) as a, running(config) as b:
        app_a, app_b, operator_b = (
            openai.AsyncOpenAI(base_url=lean.url + "/v1", api_key=key, max_retries=0, timeout=10)
            for lean, key in ((a, "app-token"), (b, "app-token"), (b, "operator"))
        )
        fake.push(text_stream("Paris."), text_stream("Lyon."))
        first = await app_a.responses.create(model="default", input="Capital of France?")
        # A queued the row as it answered; B reads the database, not A's queue: wait for it.
        saved = "SELECT 1 FROM responses WHERE response_id = %s"
        async with asyncio.timeout(5):
            while not pg.sql(saved, (first.id,)):  # noqa: ASYNC110 - another writer's commit
                await asyncio.sleep(0.01)
        with pytest.raises(openai.NotFoundError) as caught:  # the chain query, on B, for B's
            await operator_b.responses.create(
                model="default", input="Mine?", previous_response_id=first.id
            )
        assert caught.value.code == "previous_response_not_found"
        async with app_b.responses.stream(
            model="default", input="And the second city?", previous_response_id=first.id
        ) as stream:
            second = await stream.get_final_response()
        assert second.output_text == "Lyon."
        sent = [m["content"] for m in fake.requests[-1].body["messages"]]
        assert sent == ["Capital of France?", "Paris.", "And the second city?"]
        for client in (app_a, app_b, operator_b):
            await client.close()
    assert pg.sql("SELECT client, previous_id FROM responses ORDER BY previous_id NULLS FIRST") == [
        ("app", None),
        ("app", first.id),
    ]


def admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


async def test_a_database_that_goes_away_is_told_refused_and_recovered(
    pg: PgTarget, fake: FakeOpenAI
) -> None:
    """The database refuses lean (its connections cut, new ones refused): `done` says
    `saved: false`, new runs and reads get 503 store_unavailable, /readyz fails; when it
    takes connections again lean finds out by itself and writes what it kept."""
    name = pg.where.rpartition("/")[2]
    config = lean_config(fake.base_url, store=f"url = {pg.where}", extra=SCENE)
    ndjson = {"Accept": "application/x-ndjson"}
    scene = "/v1/scenes/chat/stream"
    async with running(config) as lean, aiohttp.ClientSession() as http:
        fake.push(text_stream("first."))
        async with http.post(lean.url + scene, json={"message": "one"}, headers=ndjson) as resp:
            events = [msgspec.json.decode(line) async for line in resp.content if line.strip()]
        old = events[0]["conversationId"]
        try:
            admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                f" WHERE datname = '{name}' AND application_name = 'lean'"
            )
            # A new conversation needs no read: its run starts, its saves fail.
            fake.push(text_stream("an answer kept for later"))
            async with http.post(lean.url + scene, json={"message": "two"}, headers=ndjson) as resp:
                events = [msgspec.json.decode(line) async for line in resp.content if line.strip()]
            cid = events[0]["conversationId"]
            assert (events[-1]["type"], events[-1]["saved"]) == ("done", False)
            for method, path in (
                ("POST", scene),  # a new run: refused before any provider call
                ("GET", f"/v1/conversations/{old}/messages"),  # a read
            ):
                async with http.request(method, lean.url + path, json={"message": "x"}) as resp:
                    assert resp.status == 503, path
                    assert int(resp.headers["Retry-After"]) >= 1  # retryable
                    assert (await resp.json())["error"]["code"] == "store_unavailable"
            async with http.get(lean.url + "/readyz") as resp:
                assert resp.status == 503
        finally:
            admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        async with asyncio.timeout(10):
            while True:
                async with http.get(lean.url + "/readyz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
        async with http.get(f"{lean.url}/v1/conversations/{cid}/messages") as resp:
            rows = (await resp.json())["messages"]
        # The first turn and the final save were written with the first commit that succeeded.
        assert [(r["role"], r["status"], r["content"]) for r in rows] == [
            ("user", "complete", "two"),
            ("assistant", "complete", "an answer kept for later"),
        ]
        async with http.get(lean.url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'lean_store_failures_total{op="save"}' in metrics


def test_a_url_password_never_shows() -> None:
    shown = lean.store_pg.redacted("postgresql://lean:s3cret@db.internal:5432/lean")
    assert shown == "postgresql://lean:***@db.internal:5432/lean"
    shown = lean.store_pg.redacted("postgresql://db/lean?user=lean&password=s3cret&sslmode=require")
    assert "s3cret" not in shown and "sslmode=require" in shown


async def test_an_unreachable_database_fails_open_without_its_password() -> None:
    store = Store("postgresql://lean:s3cret@127.0.0.1:9/lean?connect_timeout=2")
    assert store.backend.shown == "postgresql://lean:***@127.0.0.1:9/lean?connect_timeout=2"
    with pytest.raises(store.backend.errors) as info:
        await store.open()
    assert "s3cret" not in str(info.value)


# A step as another feature would append it: a column, an index, a table, types of both.
EXTRA_STEP = (
    "ALTER TABLE messages ADD COLUMN region TEXT;"
    " CREATE INDEX IF NOT EXISTS messages_by_region ON messages (region);"
    " CREATE TABLE feedback (feedback_id TEXT PRIMARY KEY, body TEXT NOT NULL,"
    " created REAL NOT NULL, size INTEGER);"
)


async def test_a_plain_sql_step_appended_to_migrations_runs_on_both(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(target.where)  # a database at today's version, with a message
    await store.open()
    await ask(store, "a")
    await store.close()
    for backend in (lean.store_sqlite, lean.store_pg):
        monkeypatch.setattr(backend, "MIGRATIONS", [*MIGRATIONS, EXTRA_STEP])
        monkeypatch.setattr(backend, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    store = Store(target.where)
    await store.open()
    try:
        assert [m.turn for m in await store.messages("a")] == [1]
        assert await ask(store, "a") == 2
    finally:
        await store.close()
    assert target.version() == SCHEMA_VERSION + 1
    target.sql("INSERT INTO feedback VALUES ('f1', '{}', 1700000000.123456, 2)")
    assert target.sql("SELECT created FROM feedback") == [(1700000000.123456,)]  # 8 bytes
    assert target.sql("SELECT count(region) FROM messages") == [(0,)]
