"""Property test: whatever bytes or JSON values a trace file holds, the reader gives a valid trace
or a clean ``TraceFormatError`` naming the file, never another exception."""

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traces.format import Trace
from traces.reader import TraceFormatError, load_trace
from traces.stream import index_trace, iter_sessions

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
# call-shaped objects: the real keys with random (often almost right) values
segment = st.tuples(st.sampled_from(["a", "b", "", "c[0]"]) | json_values,
                    st.integers(min_value=-2, max_value=20) | json_values).map(list)
call_like = st.fixed_dictionaries({}, optional={
    "session_id": st.sampled_from(["s", "t"]) | json_values,
    "turn": st.integers(min_value=-1, max_value=3) | json_values,
    "prompt": st.lists(segment | json_values, max_size=4) | json_values,
    "output_tokens": st.integers(min_value=-1, max_value=10**12) | json_values,
    "output_segment": st.none() | st.sampled_from(["o", ""]) | json_values,
    "tools": st.lists(st.fixed_dictionaries({}, optional={"name": st.just("bash") | json_values,
                                                          "category": json_values,
                                                          "duration_s": st.floats() | json_values}), max_size=2)
    | json_values,
    "gap_s": json_values, "timestamp_s": json_values, "latency_s": json_values,
    "format": st.just("cwtrace") | json_values, "version": st.just(1) | json_values,
    "extends": json_values, "append": json_values,
})


def _read(data: bytes, name: str, skip_bad: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            trace = load_trace(path, skip_bad=skip_bad)
        except TraceFormatError as e:
            assert str(e).startswith(f"{path}:") and "\n" not in str(e)
            if not skip_bad:  # the streaming reader's first pass rejects the file with the same error
                try:
                    index = index_trace(path)
                except TraceFormatError as e2:
                    assert str(e2) == str(e)
                else:  # (or gives up first: interleaved sessions, read whole by load_trace)
                    assert index is None
            return
        if not skip_bad:
            index = index_trace(path)
            assert index is None or list(iter_sessions(index)) == trace.sessions
        assert isinstance(trace, Trace) and trace.num_calls >= 1
        for s in trace.sessions:
            assert [c.turn for c in s.calls] == list(range(len(s.calls)))


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_random_bytes(data, gz, skip_bad):
    _read(gzip.compress(data, mtime=0) if gz else data,
          "t.jsonl.gz" if gz else "t.jsonl", skip_bad)


@FUZZ
@given(st.lists(json_values | call_like, min_size=0, max_size=6), st.booleans())
def test_random_json_lines(values, skip_bad):
    data = "\n".join(json.dumps(v) for v in values).encode()
    _read(data, "t.jsonl", skip_bad)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_as_gzip(data):
    _read(data, "t.jsonl.gz", False)
