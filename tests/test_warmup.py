"""The replay's warm-up: its waves sized to the pool, and a server that cannot empty its cache refused in one line.

(The warm-up against a real vLLM server: tests/test_replay_live.py.)"""

import asyncio
import socket

import pytest

from tests.oracle_workloads import agent_sessions


def test_the_waves_are_the_first_calls_then_the_second_calls_prompts_cut_to_the_pool():
    from replay.warmup import warmup_waves

    sessions = agent_sessions(6, 5, 3, system=64)
    first = [(s.calls[0].prompt_tokens, s.calls[0].output_tokens) for s in sessions[:4]]
    second = [(s.calls[1].prompt_tokens, s.calls[1].output_tokens) for s in sessions[:4]]
    assert first == [(114, 45), (108, 53), (169, 57), (175, 58)]
    assert warmup_waves(sessions, 4, 32, 1000) == [first, second]
    # 48 blocks (47 usable): the first wave takes 5 + 6 + 8 + 8 = 27; the grown prompts' new blocks (their
    # blocks less the first prompts' 3, 3, 5, 5 whole ones) come from the other 20: 5 + 8 + 6 fit, + 8 does not
    assert warmup_waves(sessions, 4, 32, 48) == [first, second[:3]]
    # 12 blocks (11 usable): the first two calls fit (5 + 6 blocks), no block is left for a grown prompt
    assert warmup_waves(sessions, 4, 32, 12) == [first[:2], []]
    assert warmup_waves(sessions, 4, 32, 2) == [[], []]
    # more agents than sessions: every session once; a session of one call repeats its first call's shape
    one = agent_sessions(2, 1, 3, system=64)
    assert warmup_waves(one, 8, 32, 1000) == [[(c.prompt_tokens, c.output_tokens) for c in
                                                (one[0].calls[0], one[1].calls[0])]] * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_without_the_reset_endpoint_is_named_with_what_to_do():
    """A stand-in for a vLLM server started without dev mode (the boundary: its HTTP answers): completions
    answer, POST /reset_prefix_cache is 404."""
    import aiohttp
    from aiohttp import web

    from replay.live import ReplayError
    from replay.warmup import warm_up

    seen = []

    async def completions(request):
        body = await request.json()
        seen.append((len(body["prompt"]), body["max_tokens"], body["logprobs"]))
        return web.json_response({"usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1}})

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as session:
                return await warm_up(session, f"http://127.0.0.1:{port}", "m", [[(40, 3)], [(70, 2)]], 1000,
                                     stream=False)
        finally:
            await runner.cleanup()

    with pytest.raises(ReplayError) as e:
        asyncio.run(main())
    assert str(e.value).startswith("server http://127.0.0.1:")
    assert "POST /reset_prefix_cache: HTTP 404" in str(e.value) and "VLLM_SERVER_DEV_MODE=1" in str(e.value)
    assert "--no-warmup" in str(e.value)
    assert seen == [(40, 3, 0), (70, 2, 0)]  # the waves went out, with a replay's body (logprob tokens)


def test_an_unreachable_server_is_named():
    import aiohttp

    from replay.live import ReplayError
    from replay.warmup import warm_up

    async def main():
        async with aiohttp.ClientSession() as session:
            await warm_up(session, f"http://127.0.0.1:{_free_port()}", "m", [[(40, 3)]], 1000, stream=False)

    with pytest.raises(ReplayError, match=r"^server http://127\.0\.0\.1:\d+: ClientConnectorError during the "
                                          r"warm-up .*is the server running\?"):
        asyncio.run(main())
