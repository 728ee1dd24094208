"""RPCClient.generate (the streamed `generate` RPC of ENGINE_RPC.md) and RPCClient.abort, against a
small fake ROUTER that streams the way the engine does: replies with "more", then one final reply."""

import pytest

from client.rpc import RemoteBadRequest, RPCClient, RPCError, RPCTimeout
from graphserver import protocol

from fake_engine import next_token
from rpc_helpers import ScriptedRouter, send_reply

VOCAB = 97
TIMEOUT_S = 10.0


def expected(prompt, n, stops=()):
    out, t = [], prompt[-1]
    while len(out) < n:
        t = next_token(t, VOCAB)
        out.append(t)
        if t in stops:
            break
    return out


class FakeGenerate:
    """on_request for ScriptedRouter. `generate` answers with `per_reply` tokens per streamed reply.
    pause=True sends only the first reply and keeps the rest until an `abort` comes."""

    def __init__(self, per_reply=2, pause=False):
        self.per_reply = per_reply
        self.pause = pause
        self.live = {}  # request_id -> (frames, msg_id, tokens sent)

    @staticmethod
    def _result(rid, tokens, reason=None, total=0, prompt=0):
        r = {"request_id": rid, "tokens": tokens, "finished": reason is not None, "finish_reason": reason,
             "model_version": "7"}
        if reason is not None:
            r["usage"] = {"prompt_tokens": prompt, "completion_tokens": total}
            r["metrics"] = {"queue_ms": 0.1, "ttft_ms": 1.0, "e2e_ms": 2.0}
        return r

    def __call__(self, sock, frames, req):
        method, msg_id = req["method"], req["id"]
        if method == "hello":
            return send_reply(sock, frames, protocol.make_ok(msg_id, {"protocol_version": protocol.PROTOCOL_VERSION}))
        if method == "abort":
            return self._abort(sock, frames, msg_id, req["params"]["request_id"])
        if method != "generate":
            return send_reply(sock, frames, protocol.make_ok(msg_id, {"method": method}))
        p = protocol.validate_params("generate", req["params"])  # what the client sent is valid
        rid = p["request_id"]
        if rid in self.live:
            return send_reply(sock, frames, protocol.make_error(msg_id, "BadRequest", f"duplicate request_id {rid!r}"))
        tokens = expected(p["prompt_ids"], p["max_tokens"], set(p["stop_token_ids"]))
        reason = "stop" if tokens[-1] in p["stop_token_ids"] else "length"
        n_prompt = len(p["prompt_ids"])
        if not p["stream"]:
            return send_reply(sock, frames, protocol.make_ok(msg_id, self._result(rid, tokens, reason, len(tokens),
                                                                                  n_prompt)))
        chunks = [tokens[i:i + self.per_reply] for i in range(0, len(tokens), self.per_reply)]
        if self.pause:
            send_reply(sock, frames, protocol.make_ok(msg_id, self._result(rid, chunks[0]), more=True))
            self.live[rid] = (frames, msg_id, chunks)
            return None
        for c in chunks[:-1]:
            send_reply(sock, frames, protocol.make_ok(msg_id, self._result(rid, c), more=True))
        send_reply(sock, frames, protocol.make_ok(msg_id, self._result(rid, chunks[-1], reason, len(tokens),
                                                                       n_prompt)))
        return None

    def _abort(self, sock, frames, msg_id, rid):
        if rid not in self.live:
            return send_reply(sock, frames, protocol.make_ok(msg_id, {"aborted": False}))
        gen_frames, gen_id, chunks = self.live.pop(rid)
        # One more streamed reply goes out before the abort's own reply: the client must keep it
        # for the stream while it waits for the abort's answer.
        send_reply(sock, gen_frames, protocol.make_ok(gen_id, self._result(rid, chunks[1]), more=True))
        send_reply(sock, frames, protocol.make_ok(msg_id, {"aborted": True}))
        sent = len(chunks[0]) + len(chunks[1])
        send_reply(sock, gen_frames, protocol.make_ok(gen_id, self._result(rid, [], "abort", sent)))
        return None


@pytest.fixture
def ipc(tmp_path):
    return f"ipc://{tmp_path}/g.sock"


def _serve(ipc, handler):
    return ScriptedRouter(ipc, handler)


def test_generate_streams_until_the_final_reply(ipc):
    router = _serve(ipc, FakeGenerate(per_reply=2))
    try:
        with RPCClient(ipc, timeout_s=TIMEOUT_S) as c:
            s = c.generate([5, 11], max_tokens=7, sampling={"temperature": 0.5, "seed": 3}, request_id="r1")
            replies = list(s)
            assert [len(r["tokens"]) for r in replies] == [2, 2, 2, 1]
            assert [r["finished"] for r in replies] == [False, False, False, True]
            assert sum((r["tokens"] for r in replies), []) == expected([5, 11], 7)
            last = replies[-1]
            assert last["finish_reason"] == "length" and last["usage"] == {"prompt_tokens": 2, "completion_tokens": 7}
            assert s.finished and s.final is last and s.request_id == "r1"
            assert list(s) == []  # an ended stream stays ended
            assert c.status() == {"method": "status"}  # the socket is clean afterwards
        sent = router.seen[1][1]["params"]
        assert sent["deadline_s"] == TIMEOUT_S and sent["sampling"] == {"temperature": 0.5, "seed": 3}
        assert router.seen[1][0] == router.seen[2][0]  # same identity: no reconnect
    finally:
        router.stop()


def test_generate_collect_and_stop_tokens(ipc):
    router = _serve(ipc, FakeGenerate(per_reply=3))
    try:
        full = expected([4], 20)
        stop = full[5]
        assert stop not in full[:5]
        with RPCClient(ipc, timeout_s=TIMEOUT_S) as c:
            r = c.generate([4], max_tokens=20, stop_token_ids=[stop]).collect()
            assert r["tokens"] == full[:6] and r["finish_reason"] == "stop" and r["finished"]
            one = list(c.generate([4], max_tokens=5, stream=False))
            assert len(one) == 1 and one[0]["tokens"] == full[:5] and one[0]["finished"]
        rids = [req["params"]["request_id"] for _, req in router.seen if req["method"] == "generate"]
        assert len(set(rids)) == 2 and all(rids)  # fresh ids when none is given
    finally:
        router.stop()


def test_generate_error_reply_raises_and_keeps_the_socket(ipc):
    router = _serve(ipc, FakeGenerate(pause=True))
    try:
        with RPCClient(ipc, timeout_s=TIMEOUT_S) as c:
            first = c.generate([1], max_tokens=6, request_id="dup")
            next(first)
            with pytest.raises(RemoteBadRequest, match="duplicate"):
                next(c.generate([1], max_tokens=6, request_id="dup"))
            assert c.abort("dup") == {"aborted": True}
            rest = list(first)
            assert [r["finish_reason"] for r in rest] == [None, "abort"]
        assert len({ident for ident, _ in router.seen}) == 1
    finally:
        router.stop()


def test_abort_mid_stream_keeps_the_streams_replies(ipc):
    router = _serve(ipc, FakeGenerate(per_reply=2, pause=True))
    try:
        with RPCClient(ipc, timeout_s=TIMEOUT_S) as c:
            s = c.generate([9], max_tokens=10, request_id="a")
            assert next(s)["tokens"] == expected([9], 2)
            # The router sends a streamed reply before the abort's reply: it must not be lost.
            assert c.abort("a") == {"aborted": True}
            rest = list(s)
            assert [r["tokens"] for r in rest] == [expected([9], 4)[2:], []]
            assert rest[-1]["finish_reason"] == "abort" and rest[-1]["finished"]
            assert c.abort("a") == {"aborted": False}  # already finished
    finally:
        router.stop()


def test_leaving_a_stream_early_aborts_it(ipc):
    router = _serve(ipc, FakeGenerate(per_reply=2, pause=True))
    try:
        with RPCClient(ipc, timeout_s=TIMEOUT_S) as c:
            with c.generate([3], max_tokens=10, request_id="early") as s:
                for r in s:
                    break
            assert s.finished and s.final["finish_reason"] == "abort"
            assert c.status() == {"method": "status"}
        assert [r["method"] for _, r in router.seen] == ["hello", "generate", "abort", "status"]
        assert len({ident for ident, _ in router.seen}) == 1  # drained, not reset
    finally:
        router.stop()


def test_two_streams_on_one_client(ipc):
    router = _serve(ipc, FakeGenerate(per_reply=1))
    try:
        with RPCClient(ipc, timeout_s=TIMEOUT_S) as c:
            s1 = c.generate([2], max_tokens=4)
            s2 = c.generate([8], max_tokens=3)
            # Read the second first: the first one's replies arrive meanwhile and wait for it.
            assert s2.collect()["tokens"] == expected([8], 3)
            assert s1.collect()["tokens"] == expected([2], 4)
    finally:
        router.stop()


def test_stream_timeout_resets_the_socket(ipc):
    def first_reply_only(sock, frames, req):
        if req["method"] == "generate":
            rid = req["params"]["request_id"]
            send_reply(sock, frames, protocol.make_ok(req["id"], FakeGenerate._result(rid, [1]), more=True))
        elif req["method"] != "abort":
            send_reply(sock, frames, protocol.make_ok(req["id"], {"method": req["method"]}))

    router = _serve(ipc, first_reply_only)
    try:
        with RPCClient(ipc, timeout_s=TIMEOUT_S) as c:
            s = c.generate([1], max_tokens=4, timeout_s=0.5)
            assert next(s)["tokens"] == [1]
            with pytest.raises(RPCTimeout):
                next(s)
            assert s.finished
            assert c.status() == {"method": "status"}
        assert router.seen[-1][0] != router.seen[0][0]  # a fresh socket after the abandoned stream
        assert router.seen[1][1]["params"]["deadline_s"] == 0.5
    finally:
        router.stop()


def test_a_streamed_reply_to_a_plain_call_is_refused(ipc):
    def streams_everything(sock, frames, req):
        if req["method"] == "hello":
            return send_reply(sock, frames, protocol.make_ok(req["id"], {}))
        send_reply(sock, frames, protocol.make_ok(req["id"], {"part": 1}, more=True))

    router = _serve(ipc, streams_everything)
    try:
        with RPCClient(ipc, timeout_s=TIMEOUT_S) as c:
            with pytest.raises(RPCError, match="streamed"):
                c.status()
    finally:
        router.stop()
