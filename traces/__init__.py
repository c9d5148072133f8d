"""Agent-session traces: format v2 (v1 read too), reader, importers, analysis."""

from traces.format import Call, Session, ToolCall, Trace
from traces.reader import TraceFormatError, load_trace, write_trace

__all__ = ["load_trace", "write_trace", "TraceFormatError", "Call", "ToolCall", "Session", "Trace"]
