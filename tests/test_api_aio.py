"""client/aio.py: many streamed generates over one socket, abort on early exit, typed errors, timeouts."""

import asyncio
import contextlib
import time

import pytest
import zmq

from client.aio import AsyncEngineClient
from client.rpc import RemoteBadRequest, RemoteError, RPCTimeout
from fake_batch_engine import FakeBatchEngine


@pytest.fixture(scope="module")
def engine(default_model_dir):
    with FakeBatchEngine(str(default_model_dir), step_s=0.002, max_num_seqs=4, max_waiting=64) as e:
        yield e


def test_concurrent_streams_share_one_socket(engine):
    async def one(client, i):
        prompt = [100 + i, 200 + 3 * i]
        tokens, replies = [], 0
        async for r in client.generate(f"aio-{i}", prompt, max_tokens=5 + i % 4):
            assert r["request_id"] == f"aio-{i}" and r["model_version"] == "0"
            tokens += r["tokens"]
            replies += 1
        assert r["finished"] and r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == len(tokens)
        return prompt, tokens, replies

    async def main():
        async with AsyncEngineClient(engine.endpoint, 10.0) as client:
            hello, status = await asyncio.gather(client.hello(), client.status())
            assert hello["max_num_seqs"] == 4 and status["scheduler"]["running"] == 0
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    for i, (prompt, tokens, replies) in enumerate(asyncio.run(main())):
        assert tokens == engine.rule.continuation(prompt[-1], 5 + i % 4)
        # One reply per step, except where a consumer fell behind and got the waiting ones merged.
        assert 1 <= replies <= len(tokens)


def test_leaving_early_aborts_and_non_streamed_gives_one_reply(engine):
    async def main():
        async with AsyncEngineClient(engine.endpoint, 10.0) as client:
            replies = client.generate("early", [5], max_tokens=500)
            async with contextlib.aclosing(replies):
                async for r in replies:
                    break
            for _ in range(200):
                if (await client.status())["scheduler"]["running"] == 0:
                    break
                await asyncio.sleep(0.01)
            st = await client.status()
            whole = [r async for r in client.generate("whole", [5], max_tokens=6, stream=False)]
            return st, whole

    st, whole = asyncio.run(main())
    assert ("abort", {"request_id": "early"}) in engine.calls
    assert st["scheduler"]["running"] == 0 and st["kv"]["blocks_used"] == 0
    assert len(whole) == 1 and whole[0]["tokens"] == engine.rule.continuation(5, 6)


def test_error_replies_are_typed(engine):
    async def main():
        async with AsyncEngineClient(engine.endpoint, 10.0) as client:
            with pytest.raises(RemoteBadRequest, match="prompt_ids is empty"):
                async for _ in client.generate("empty", [], max_tokens=2):
                    pass
            with pytest.raises(RemoteBadRequest, match="unknown param"):
                await client.call("abort", {"request_id": "x", "bogus": 1})
            assert (await client.abort("never-was")) == {"aborted": False}

    asyncio.run(main())


def test_full_queue_is_overloaded(default_model_dir):
    async def main(endpoint):
        async with AsyncEngineClient(endpoint, 10.0) as client:
            with pytest.raises(RemoteError) as e:
                async for _ in client.generate("o", [1], max_tokens=2):
                    pass
            return e.value

    with FakeBatchEngine(str(default_model_dir), max_waiting=0) as e:
        err = asyncio.run(main(e.endpoint))
    assert err.type == "Overloaded" and "waiting queue is full" in err.message


def test_no_reply_times_out():
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")

    async def main():
        async with AsyncEngineClient(f"tcp://127.0.0.1:{port}", 0.3) as client:
            t0 = time.monotonic()
            with pytest.raises(RPCTimeout, match="status"):
                await client.status()
            return time.monotonic() - t0

    try:
        assert 0.25 < asyncio.run(main()) < 3.0
    finally:
        silent.close(0)
        ctx.term()


def test_engine_process_exit_fails_pending_calls_at_once():
    import subprocess
    import sys

    from client.rpc import ServerDead

    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])

    async def main():
        async with AsyncEngineClient(f"tcp://127.0.0.1:{port}", 30.0, process=proc) as client:
            t0 = time.monotonic()
            with pytest.raises(ServerDead, match="exited with code 0"):
                await client.status()
            with pytest.raises(ServerDead):  # and later calls fail fast too
                await client.hello()
            return time.monotonic() - t0

    try:
        assert asyncio.run(main()) < 5.0
    finally:
        proc.wait(5)
        silent.close(0)
        ctx.term()


def test_replies_waiting_for_a_slow_consumer_come_merged(default_model_dir):
    from client.rpc import ServerDead

    async def lagging(client, request_id, pause_s):
        got, replies = [], []
        try:
            async for r in client.generate(request_id, [7], max_tokens=40):
                got += r["tokens"]
                replies.append(r)
                if len(replies) == 1:
                    await asyncio.sleep(pause_s)     # the engine runs on meanwhile
        except ServerDead as e:
            return got, replies, e
        return got, replies, None

    with FakeBatchEngine(str(default_model_dir), step_s=0.002) as e:
        async def main():
            async with AsyncEngineClient(e.endpoint, 10.0) as client:
                return await lagging(client, "slow", 0.3)
        got, replies, err = asyncio.run(main())
        assert err is None and got == e.rule.continuation(7, 40)
        assert len(replies) < 10 and max(len(r["tokens"]) for r in replies) > 10
        last = replies[-1]
        assert last["finished"] and last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 40
        assert not any(r["finished"] for r in replies[:-1])

    # The engine goes away while replies wait: they still come (merged), then the error.
    e = FakeBatchEngine(str(default_model_dir), step_s=0.01).start()

    async def dying():
        async with AsyncEngineClient(e.endpoint, 10.0) as client:
            task = asyncio.ensure_future(lagging(client, "orphan", 0.5))
            await asyncio.sleep(0.2)
            e.stop()
            return await task
    got, replies, err = asyncio.run(dying())
    assert isinstance(err, ServerDead) and len(got) >= 5 and len(replies) == 2
    assert got == e.rule.continuation(7, len(got))
