"""The live replay's parts that need no vLLM: arrivals, KV event decoding and sequence gaps, resume, metrics."""

from __future__ import annotations

import asyncio
import csv
import json

import msgspec
import pytest

from replay.closed_loop import ArrivalError, ClosedLoop
from replay.kv_events import EventStream, KvEventError, SequenceTracker, decode_batch
from replay.live import LIVE_REQUEST_FIELDS, LiveConfig, ReplayError, plan, run_live
from replay.server_metrics import cache_config, parse_metrics
from traces.format import Call, Session, ToolCall, Trace


def _sessions(n=3, turns=2, gap=2.0, starts=None):
    out = []
    for s in range(n):
        calls = tuple(Call(f"s{s}", t, ((f"s{s}:p", 40 + t),), 5, f"s{s}:o{t}", (ToolCall("bash", "shell", 0.0),),
                           gap_s=gap, timestamp_s=None if starts is None or t else starts[s]) for t in range(turns))
        out.append(Session(f"s{s}", calls))
    return out


# --------------------------------------------------------------------------- arrivals
def test_concurrent_arrivals_keep_agents_sessions_and_scale_gaps():
    loop = ClosedLoop(_sessions(3), "concurrent", agents=2, time_scale=0.5)
    assert loop.pop_due(0.0) == [(0.0, 0, 0), (0.0, 1, 0)]
    assert not loop.finished(0, 0, 10.0)  # turn 1 due at 10 + 2 * 0.5
    assert loop.next_time() == 11.0 and loop.pop_due(10.9) == []
    assert loop.pop_due(11.0) == [(11.0, 0, 1)]
    assert loop.finished(0, 1, 12.0)  # session 0 done: session 2 starts at that instant
    assert loop.pop_due(12.0) == [(12.0, 2, 0)]


def test_trace_arrivals_start_at_recorded_times_and_order_ties_by_session():
    loop = ClosedLoop(_sessions(3, starts=[105.0, 100.0, 105.0]), "trace", time_scale=2.0)
    assert loop.pop_due(0.0) == [(0.0, 1, 0)]
    assert loop.pop_due(10.0) == [(10.0, 0, 0), (10.0, 2, 0)]
    assert loop.finished(1, 0, 3.0) is False and loop.pop_due(7.0) == [(7.0, 1, 1)]


def test_trace_arrivals_need_timestamps():
    with pytest.raises(ArrivalError, match="recorded timestamps.*'s0'"):
        ClosedLoop(_sessions(2), "trace")
    with pytest.raises(ArrivalError, match="--arrivals"):
        ClosedLoop(_sessions(2), "poisson")


# --------------------------------------------------------------------------- KV events
def _payload(events, ts=1.5):
    return msgspec.msgpack.encode([ts, events, 0])


def test_decode_batch_reads_events_by_type():
    b = decode_batch(7, _payload([
        {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None, "token_ids": [], "block_size": 32},
        {"type": "BlockRemoved", "block_hashes": [3, 4, 5], "medium": "GPU"},
        {"type": "AllBlocksCleared"},
    ]), "ipc://x")
    assert (b.seq, b.ts, b.stored, b.removed, b.cleared) == (7, 1.5, 2, [3, 4, 5], 1)


@pytest.mark.parametrize("payload, why", [
    (b"\xc1junk", "not msgpack"),
    (msgspec.msgpack.encode({"ts": 1}), r"expected \[ts, events, dp_rank\]"),
    (msgspec.msgpack.encode([1.0, [{"type": "Nope"}], 0]), "no known type"),
    (msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved"}], 0]), "no block_hashes"),
    (msgspec.msgpack.encode(["x", [], 0]), "timestamp"),
])
def test_decode_batch_names_the_endpoint_of_a_malformed_batch(payload, why):
    with pytest.raises(KvEventError, match=f"KV events ipc://here: malformed batch 3: .*{why}"):
        decode_batch(3, payload, "ipc://here")


def test_sequence_tracker_sees_next_old_and_gaps():
    t = SequenceTracker(5)
    assert t.offer(5) == 0 and t.expected == 6
    assert t.offer(4) == -1 and t.expected == 6
    assert t.offer(9) == 3 and t.expected == 6  # 6, 7, 8 missing: nothing taken
    u = SequenceTracker()
    assert u.offer(12) == 0 and u.expected == 13  # unknown start: the first one is it


class _Publisher:
    """vLLM's wire protocol (PUB of [topic, seq, payload]; ROUTER replay with an end marker), for the tests."""

    def __init__(self, tmp_path, buffer=100):
        import zmq

        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.endpoint, self.replay = f"ipc://{tmp_path}/ev.ipc", f"ipc://{tmp_path}/rp.ipc"
        self.pub.bind(self.endpoint)
        self.router.bind(self.replay)
        self.buffer, self.size = [], buffer

    def send(self, seq, events, publish=True):
        msg = (b"kv", seq.to_bytes(8, "big"), _payload(events))
        self.buffer = (self.buffer + [msg])[-self.size:]
        if publish:
            self.pub.send_multipart(msg)

    def serve_replay(self):
        import zmq

        while self.router.poll(0, zmq.POLLIN):
            client, _, start = self.router.recv_multipart()
            for topic, seq, payload in self.buffer:
                if int.from_bytes(seq, "big") >= int.from_bytes(start, "big"):
                    self.router.send_multipart([client, b"", topic, seq, payload])
            self.router.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])

    def close(self):
        self.pub.close(0)
        self.router.close(0)
        self.ctx.term()


def _removed(h):
    return [{"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU"}]


async def _drive(pub: _Publisher, stream: EventStream, coro):
    """Run ``coro`` while the publisher answers replay requests."""
    task = asyncio.ensure_future(coro)
    while not task.done():
        pub.serve_replay()
        await asyncio.sleep(0.01)
    return task.result()


def test_event_stream_fills_a_dropped_batch_from_the_replay_endpoint(tmp_path):
    pub = _Publisher(tmp_path)
    pub.send(0, _removed(100))  # before the run: the stream starts after it
    stream = EventStream(pub.endpoint, pub.replay, replay_timeout_s=2)

    async def scenario():
        await _drive(pub, stream, stream.start())
        assert stream.tracker.expected == 1
        pub.send(1, _removed(101))
        pub.send(2, _removed(102), publish=False)  # lost on the way
        pub.send(3, _removed(103))
        got = await _drive(pub, stream, stream.receive(2)) + await _drive(pub, stream, stream.receive(2))
        pub.send(4, _removed(104), publish=False)  # lost at the end: the catch-up finds it
        got += await _drive(pub, stream, stream.catch_up())
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        stream.close()
        pub.close()
    assert [b.seq for b in got] == [1, 2, 3, 4]
    assert [h for b in got for h in b.removed] == [101, 102, 103, 104]
    assert stream.gaps_recovered == 1 and stream.batches_recovered == 1


def test_event_stream_reports_a_gap_the_replay_buffer_no_longer_holds(tmp_path):
    pub = _Publisher(tmp_path, buffer=2)
    stream = EventStream(pub.endpoint, pub.replay, replay_timeout_s=2)

    async def scenario():
        await _drive(pub, stream, stream.start())
        for seq in range(4):
            pub.send(seq, _removed(seq), publish=False)
        pub.send(4, _removed(4))
        return await _drive(pub, stream, stream.receive(2))

    try:
        with pytest.raises(KvEventError, match=rf"KV events {pub.endpoint}: batches 0..2 lost and no longer in "
                                               rf"the replay buffer of {pub.replay}"):
            asyncio.run(scenario())
    finally:
        stream.close()
        pub.close()


def test_event_stream_without_replay_reports_a_gap(tmp_path):
    pub = _Publisher(tmp_path)
    stream = EventStream(pub.endpoint, None)

    async def scenario():
        await stream.start()
        pub.send(0, _removed(1))
        await stream.receive(2)
        pub.send(3, _removed(2))
        return await stream.receive(2)

    try:
        with pytest.raises(KvEventError, match=r"2 batch\(es\) lost \(1..2\) and no replay endpoint"):
            asyncio.run(scenario())
    finally:
        stream.close()
        pub.close()


def test_event_stream_names_a_silent_replay_endpoint(tmp_path):
    stream = EventStream(f"ipc://{tmp_path}/none.ipc", f"ipc://{tmp_path}/none-replay.ipc", replay_timeout_s=0.3)
    try:
        with pytest.raises(KvEventError, match=f"KV event replay ipc://{tmp_path}/none-replay.ipc: no answer"):
            asyncio.run(stream.start(settle_s=0))
    finally:
        stream.close()


# --------------------------------------------------------------------------- resume bookkeeping
def _write_csv(path, fields, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        w.writerows(rows)


def test_resume_keeps_finished_sessions_and_drops_the_rest(tmp_path):
    trace = Trace(_sessions(3), source="t")
    cfg = LiveConfig(server="http://127.0.0.1:1")
    todo, state = plan(trace, cfg, tmp_path, resume=False)
    assert [s.session_id for s in todo] == ["s0", "s1", "s2"] and state["attempts"] == []
    (tmp_path / "run.json").write_text(json.dumps(state))
    row = lambda sid, turn: [sid, turn, 0, 0, 0, 1, 40, 5, 0, "", 0, 0, 0.1, 1]  # noqa: E731
    _write_csv(tmp_path / "requests.csv", LIVE_REQUEST_FIELDS, [row("s1", 0), row("s1", 1), row("s0", 0)])
    _write_csv(tmp_path / "sessions.csv", ["session_id", "calls", "start_s", "end_s", "duration_s", "prompt_tokens",
                                           "cached_tokens", "recomputed_tokens", "preemptions"],
               [["s1", 2, 0, 1, 1, 81, 0, "", 0]])
    (tmp_path / "outputs.jsonl").write_text("".join(json.dumps({"session_id": s, "turn": t, "tokens": [5]}) + "\n"
                                                    for s, t in (("s1", 0), ("s1", 1), ("s0", 0))))
    todo, state = plan(trace, cfg, tmp_path, resume=True)
    assert [s.session_id for s in todo] == ["s0", "s2"]
    with open(tmp_path / "requests.csv") as f:
        assert [(r["session_id"], r["turn"]) for r in csv.DictReader(f)] == [("s1", "0"), ("s1", "1")]
    assert [json.loads(ln)["session_id"] for ln in (tmp_path / "outputs.jsonl").read_text().splitlines()] == ["s1"] * 2
    with pytest.raises(ReplayError, match="--resume: .* a run of other sessions"):
        plan(trace, LiveConfig(server="http://127.0.0.1:1", max_sessions=2), tmp_path, resume=True)
    todo, _ = plan(trace, cfg, tmp_path, resume=False)  # a fresh run starts over
    assert len(todo) == 3 and not (tmp_path / "requests.csv").exists()


def test_an_unreachable_server_is_one_error_naming_it(tmp_path):
    from replay.server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ReplayError, match=f"server {url} unreachable"):
        run_live(Trace(_sessions(1), source="t"), LiveConfig(server=url), tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["partial"] and s["source"] == "vllm" and s["sessions"] == 0 and "unreachable" in s["stopped_by"]


def test_cli_run_unreachable_server_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from replay.cli import app
    from replay.server import free_port
    from traces.reader import write_trace

    trace = tmp_path / "t.jsonl"
    write_trace(trace, Trace(_sessions(1), source="t").calls())
    url = f"http://127.0.0.1:{free_port()}"
    res = CliRunner().invoke(app, ["run", "--trace", str(trace), "--server", url, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "Traceback" not in res.output and f"server {url} unreachable" in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output


def test_run_names_a_missing_event_socket(tmp_path):
    # a server that answers (this test's own), events at a socket that does not exist
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b'{"data":[{"id":"m"}]}' if self.path == "/v1/models" else b""
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ev = f"ipc://{tmp_path}/missing.ipc"
        with pytest.raises(ReplayError, match=f"--events {ev}: no such socket"):
            run_live(Trace(_sessions(1), source="t"),
                     LiveConfig(server=f"http://127.0.0.1:{srv.server_port}", events=ev), tmp_path / "o")
    finally:
        srv.shutdown()


# --------------------------------------------------------------------------- /metrics
METRICS = """# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 320.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 64.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 3.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",num_gpu_blocks="80",enable_prefix_caching="True"} 1.0
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 4.0
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 4.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 0.25
# TYPE vllm:request_inference_time_seconds histogram
vllm:request_inference_time_seconds_count{engine="0",model_name="m"} 4.0
vllm:request_inference_time_seconds_sum{engine="0",model_name="m"} 1.75
"""


def test_parse_metrics_sums_counters_over_labels():
    m = parse_metrics(METRICS)
    assert m["prefix_cache_hits"] == 384 and m["prefix_cache_queries"] == 1000 and m["preemptions"] == 3
    assert m["prompt_tokens"] == 0  # absent: 0
    # histograms: their sums (the bucket and count samples are not taken for them)
    assert m["request_queue_s"] == 0.25 and m["request_inference_s"] == 1.75
    assert cache_config(METRICS) == {"num_gpu_blocks": 80, "block_size": 32}


def test_outside_engine_is_the_client_latency_less_the_engine_cores_time():
    """``summary.json``'s ``outside_engine_s``: the mean client end-to-end latency less vLLM's queue and
    inference time per finished request; None where the server gave no such figures."""
    from replay.live import outside_engine

    m = {**parse_metrics(METRICS), "requests_finished": 4.0}
    # 4 calls of 0.6 s mean latency, 2.0 s of engine-core time among them: 0.1 s each outside it
    assert outside_engine([0.5, 0.7, 0.4, 0.8], m) == pytest.approx(0.6 - 2.0 / 4)
    assert outside_engine([], m) is None
    assert outside_engine([0.5], {**m, "requests_finished": 0.0}) is None
    assert outside_engine([0.5], {"requests_finished": 1.0}) is None  # a server without the histograms


def test_cli_serve_bad_flag_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from replay.cli import app

    res = CliRunner().invoke(app, ["serve", "--kv-blocks", "1", "--dir", str(tmp_path / "srv")])
    assert res.exit_code == 2 and "--kv-blocks must be >= 2" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["serve", "--kv-blocks", "8", "--max-num-seqs", "16", "--max-num-batched-tokens",
                                   "8", "--dir", str(tmp_path / "srv")])
    assert res.exit_code == 2 and "--max-num-batched-tokens (8) must be >= --max-num-seqs" in res.output
    res = CliRunner().invoke(app, ["serve", "--kv-blocks", "8", "--dir", str(tmp_path / ("x" * 120))])
    assert res.exit_code == 2 and "path too long for the KV event sockets" in res.output
    # short enough for kv-replay.ipc, too long for vLLM's own sockets (a uuid in the folder's tmp/)
    folder = tmp_path / ("y" * max(1, 100 - len(str(tmp_path / "kv-replay.ipc")) - 2))
    assert len(str(folder / "kv-replay.ipc")) <= 100 < len(str(folder / "tmp" / ("0" * 36)))
    res = CliRunner().invoke(app, ["serve", "--kv-blocks", "8", "--dir", str(folder)])
    assert res.exit_code == 2 and "path too long for the KV event sockets" in res.output


def test_compare_scales_gaps_and_refuses_a_partial_run(tmp_path):
    from replay.live_compare import CompareError, compare_live, scaled
    from traces.reader import write_trace

    t = scaled(Trace(_sessions(2, starts=[10.0, 20.0]), source="t"), 0.5)
    assert [c.gap_s for c in t.sessions[0].calls] == [1.0, 1.0] and t.sessions[1].start_s == 10.0
    with pytest.raises(CompareError, match="not a cwreplay run folder"):
        compare_live(tmp_path, "unit", max_num_seqs=4, max_num_batched_tokens=256)
    (tmp_path / "run.json").write_text(json.dumps({"config": {"time_scale": 1.0}, "trace": str(tmp_path / "gone")}))
    (tmp_path / "summary.json").write_text(json.dumps({"partial": False}))
    with pytest.raises(CompareError, match="trace .*gone.* is not a file here: give --trace"):
        compare_live(tmp_path, "unit", max_num_seqs=4, max_num_batched_tokens=256)
    (tmp_path / "summary.json").write_text(json.dumps({"partial": True, "stopped_by": "interrupt"}))
    with pytest.raises(CompareError, match="partial .*--resume"):
        compare_live(tmp_path, "unit", max_num_seqs=4, max_num_batched_tokens=256)
    # a policy run whose predictor trace is gone from this machine (recorded in run.json, or given)
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [c for s in _sessions(2) for c in s.calls])
    (tmp_path / "run.json").write_text(json.dumps({"config": {"time_scale": 1.0, "policy": "cachewise",
                                                              "predictor_trace": str(tmp_path / "hist-gone")},
                                                   "trace": str(trace)}))
    (tmp_path / "summary.json").write_text(json.dumps({"partial": False}))
    with pytest.raises(CompareError, match="predictor trace .*hist-gone.* is not a file here: give --predictor-trace"):
        compare_live(tmp_path, "unit", max_num_seqs=4, max_num_batched_tokens=256)
    with pytest.raises(CompareError, match="predictor trace .*other-gone.* is not a file here"):
        compare_live(tmp_path, "unit", max_num_seqs=4, max_num_batched_tokens=256,
                     predictor_trace=tmp_path / "other-gone")


def test_a_folder_not_compared_yet_is_named_with_the_missing_file(tmp_path):
    from replay.report import ComparisonError, load_comparison

    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ComparisonError, match=r"compare\.json: no such file \(run `cwreplay compare` on it first\)"):
        load_comparison(tmp_path)


def test_the_committed_replay_example_reads_back_whole():
    """notebooks/data/replay-example: a real compared run (vLLM on CPU against cwsim), read by the notebook."""
    from pathlib import Path

    from replay.report import load_comparison, make_figures

    c = load_comparison(Path(__file__).resolve().parents[1] / "notebooks" / "data" / "replay-example")
    assert c.real["source"] == "vllm" and c.compare["calls_compared"] == len(c.calls) == c.real["requests"]
    assert c.compare["evicted_blocks"]["real"] == (c.evictions["side"] == "real").sum() > 0
    assert c.compare["evicted_blocks"]["sim"] == (c.evictions["side"] == "sim").sum()
    head = c.headline()
    assert head.loc["evicted blocks", "real (vLLM)"] == c.real["evicted_blocks"]
    assert set(make_figures(c)) == {"sessions", "latency_cdf", "evictions", "cached_tokens", "session_bars"}


def test_compare_gives_the_servers_policy_settings_to_the_simulated_policy(tmp_path):
    """``cwreplay run --setting`` is recorded in run.json; the comparison simulates the policy with it, and a
    setting the simulator cannot be given is an error naming the run and the setting."""
    from replay.live_compare import CompareError, simulation_of
    from traces.reader import write_trace

    trace, hist = tmp_path / "t.jsonl", tmp_path / "h.jsonl"
    write_trace(trace, [c for s in _sessions(2) for c in s.calls])
    write_trace(hist, [c for s in _sessions(2) for c in s.calls])
    config = {"time_scale": 1.0, "policy": "working-set", "predictor_trace": str(hist), "arrivals": "concurrent",
              "agents": 2, "max_sessions": None, "policy_settings": [["min_idle_s", 0.24]]}
    (tmp_path / "run.json").write_text(json.dumps({"config": config, "trace": str(trace)}))
    (tmp_path / "summary.json").write_text(json.dumps({"partial": False, "kv_blocks": 64, "block_size": 16}))
    _, cfg = simulation_of(tmp_path, "unit", max_num_seqs=4, max_num_batched_tokens=256)
    assert (cfg.policy, cfg.min_idle_s, cfg.predictor_trace) == ("working-set", 0.24, str(hist))
    config["policy_settings"] = [["headroom", 0.3]]
    (tmp_path / "run.json").write_text(json.dumps({"config": config, "trace": str(trace)}))
    with pytest.raises(CompareError, match=f"{tmp_path}: policy setting 'headroom' has no cwsim configuration field"):
        simulation_of(tmp_path, "unit", max_num_seqs=4, max_num_batched_tokens=256)
    del config["policy_settings"]  # a run recorded before settings were: the policy's defaults
    (tmp_path / "run.json").write_text(json.dumps({"config": config, "trace": str(trace)}))
    assert simulation_of(tmp_path, "unit", max_num_seqs=4, max_num_batched_tokens=256)[1].min_idle_s == 0.0
