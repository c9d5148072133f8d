"""vLLM's KV-cache events, received over ZMQ with every sequence number checked.

vLLM 0.32's ``ZmqEventPublisher`` sends one multipart message per engine step
that changed the cache: ``[topic, seq, payload]``, ``seq`` an 8-byte
big-endian counter from 0, ``payload`` a msgpack ``[ts, events, dp_rank]``
whose events are maps tagged by ``type`` (``BlockStored``, ``BlockRemoved``,
``AllBlocksCleared``). A PUB socket drops what a slow or late subscriber
misses, so:

- :class:`SequenceTracker` says, for each arriving number, whether it is the
  next one, an old one (a duplicate) or one past a gap;
- :class:`EventStream` fills a gap from the publisher's replay endpoint (a
  ROUTER: a DEALER sends the first missing number and receives the buffered
  batches, then an end marker), and raises :class:`KvEventError` naming the
  endpoint when it cannot (no replay endpoint, or the batches have left its
  buffer);
- :meth:`EventStream.start` learns where the stream stands before a run (the
  replay buffer's last number), so a batch missed before the first one that
  arrives is caught too, and :meth:`EventStream.catch_up` asks for whatever the
  publisher sent after the last batch received.

:func:`decode_batch` turns a payload into a :class:`Batch` (no fixed array
schema: events are read by their ``type``), or a one-line :class:`KvEventError`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import msgspec

#: the publisher's end-of-replay marker (-1 as a signed 8-byte big-endian number)
END_SEQ = (-1).to_bytes(8, "big", signed=True)
KINDS = ("BlockStored", "BlockRemoved", "AllBlocksCleared")


class KvEventError(RuntimeError):
    """A KV event stream that cannot be trusted: a malformed batch, a lost batch, a silent endpoint."""


@dataclass(slots=True)
class Batch:
    """One engine step's KV events."""

    seq: int
    ts: float
    removed: list[int] = field(default_factory=list)  #: hashes of the BlockRemoved events, in order
    stored: int = 0  #: hashes in the BlockStored events
    cleared: int = 0  #: AllBlocksCleared events


_decoder = msgspec.msgpack.Decoder()


def decode_seq(raw: bytes, endpoint: str) -> int:
    if len(raw) != 8:
        raise KvEventError(f"KV events {endpoint}: malformed sequence number ({len(raw)} bytes, expected 8)")
    return int.from_bytes(raw, "big")


def decode_batch(seq: int, payload: bytes, endpoint: str) -> Batch:
    """The events of batch ``seq``; :class:`KvEventError` naming ``endpoint`` if it is malformed."""

    def bad(why: str) -> KvEventError:
        return KvEventError(f"KV events {endpoint}: malformed batch {seq}: {why}")

    try:
        obj = _decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise bad(f"not msgpack ({e})") from None
    if not isinstance(obj, list) or len(obj) < 2 or not isinstance(obj[1], list):
        raise bad("expected [ts, events, dp_rank]")
    ts = obj[0]
    if not isinstance(ts, (int, float)):
        raise bad(f"timestamp is {type(ts).__name__}, not a number")
    b = Batch(seq, float(ts))
    for i, ev in enumerate(obj[1]):
        kind = ev.get("type") if isinstance(ev, dict) else None
        if kind not in KINDS:
            raise bad(f"event {i} has no known type ({kind!r})" if isinstance(ev, dict) else f"event {i} is not a map")
        if kind == "AllBlocksCleared":
            b.cleared += 1
            continue
        hashes = ev.get("block_hashes")
        if not isinstance(hashes, list):
            raise bad(f"event {i} ({kind}) has no block_hashes list")
        if kind == "BlockRemoved":
            for h in hashes:
                b.removed.append(h if isinstance(h, int) else int.from_bytes(bytes(h)[-8:], "big"))
        else:
            b.stored += len(hashes)
    return b


class SequenceTracker:
    """The next sequence number expected, and what an arriving one means.

    ``expected`` None: nothing is known yet, the first number offered is taken as the start.
    """

    def __init__(self, expected: int | None = None):
        self.expected = expected

    def offer(self, seq: int) -> int:
        """0: ``seq`` is the next one (taken: ``expected`` moves past it); -1: an old one (drop it);
        n > 0: ``n`` batches are missing before it (nothing taken)."""
        if self.expected is None:
            self.expected = seq
        if seq == self.expected:
            self.expected += 1
            return 0
        if seq < self.expected:
            return -1
        return seq - self.expected


class EventStream:
    """A sequence-checked subscription to a vLLM server's KV events (asyncio; pyzmq)."""

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, topic: str = "kv",
                 replay_timeout_s: float = 5.0):
        import zmq
        import zmq.asyncio

        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.replay_timeout_s = replay_timeout_s
        self.tracker = SequenceTracker()
        self.gaps_recovered = 0
        self.batches_recovered = 0
        self._zmq = zmq
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 0)  # keep every batch: the replay buffer is the fallback, not the plan
        self._sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        try:
            self._sub.connect(endpoint)
        except zmq.ZMQError as e:
            raise KvEventError(f"KV events {endpoint}: cannot connect ({e})") from None
        self._dealer = None

    # ------------------------------------------------------------ replay
    async def _replay(self, start: int) -> list[tuple[int, bytes]]:
        """The publisher's buffered batches from ``start`` on (``[]`` if it has none)."""
        zmq = self._zmq
        if self._dealer is None:
            self._dealer = self._ctx.socket(zmq.DEALER)
            self._dealer.setsockopt(zmq.LINGER, 0)
            try:
                self._dealer.connect(self.replay_endpoint)
            except zmq.ZMQError as e:
                raise KvEventError(f"KV event replay {self.replay_endpoint}: cannot connect ({e})") from None
        await self._dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            if not await self._dealer.poll(self.replay_timeout_s * 1000):
                raise KvEventError(f"KV event replay {self.replay_endpoint}: no answer within "
                                   f"{self.replay_timeout_s:g} s (is the server running?)")
            frames = await self._dealer.recv_multipart()
            if len(frames) != 4:
                raise KvEventError(f"KV event replay {self.replay_endpoint}: malformed answer of {len(frames)} frames")
            _, _, seq_raw, payload = frames
            if seq_raw == END_SEQ:
                return out
            out.append((decode_seq(seq_raw, self.replay_endpoint), payload))

    async def start(self, settle_s: float = 0.3) -> None:
        """Learn where the stream stands before the run: the next number is one past the replay buffer's last.

        Without a replay endpoint, the first batch that arrives is taken as the start.
        """
        await asyncio.sleep(settle_s)  # let the subscription reach the publisher (ZMQ's slow joiner)
        if self.replay_endpoint is None:
            return
        buffered = await self._replay(0)
        self.tracker.expected = buffered[-1][0] + 1 if buffered else 0
        while await self._sub.poll(0):  # batches published before the run: not ours
            await self._sub.recv_multipart()

    # ------------------------------------------------------------ receive
    def _take(self, seq: int, payload: bytes, endpoint: str, out: list[Batch]) -> None:
        if self.tracker.offer(seq) == 0:
            out.append(decode_batch(seq, payload, endpoint))

    async def _fill(self, seq: int, missing: int, out: list[Batch]) -> None:
        """Recover the ``missing`` batches before ``seq`` from the replay endpoint, or raise."""
        first = self.tracker.expected
        if self.replay_endpoint is None:
            raise KvEventError(f"KV events {self.endpoint}: {missing} batch(es) lost ({first}..{seq - 1}) "
                               "and no replay endpoint to recover them (--events-replay)")
        rseq = seq
        for rseq, payload in await self._replay(first):
            if rseq >= seq or rseq > self.tracker.expected:
                break
            self._take(rseq, payload, self.replay_endpoint, out)
        if self.tracker.expected != seq:
            last = min(seq, rseq) - 1
            raise KvEventError(f"KV events {self.endpoint}: batches {self.tracker.expected}..{last} lost and "
                               f"no longer in the replay buffer of {self.replay_endpoint}")
        self.gaps_recovered += 1
        self.batches_recovered += seq - first

    async def handle(self, frames: list[bytes]) -> list[Batch]:
        """The new batches a received message brings (a recovered gap before it included), in order."""
        if len(frames) != 3:
            raise KvEventError(f"KV events {self.endpoint}: malformed message of {len(frames)} frames "
                               "(expected topic, sequence number, payload)")
        _, seq_raw, payload = frames
        seq = decode_seq(seq_raw, self.endpoint)
        out: list[Batch] = []
        missing = self.tracker.offer(seq)
        if missing > 0:
            await self._fill(seq, missing, out)
            self.tracker.offer(seq)
        elif missing < 0:
            return out
        out.append(decode_batch(seq, payload, self.endpoint))
        return out

    async def receive(self, timeout_s: float | None = None) -> list[Batch]:
        """The batches of the next message (``[]`` after ``timeout_s`` without one)."""
        if timeout_s is not None and not await self._sub.poll(timeout_s * 1000):
            return []
        return await self.handle(await self._sub.recv_multipart())

    async def catch_up(self) -> list[Batch]:
        """Everything published after the last batch received: queued messages, then the replay buffer's tail."""
        out: list[Batch] = []
        while await self._sub.poll(0):
            out += await self.handle(await self._sub.recv_multipart())
        if self.replay_endpoint is not None and self.tracker.expected is not None:
            first = self.tracker.expected
            for rseq, payload in await self._replay(first):
                self._take(rseq, payload, self.replay_endpoint, out)
                if self.tracker.expected <= rseq:
                    raise KvEventError(f"KV events {self.endpoint}: batches {self.tracker.expected}..{rseq - 1} lost "
                                       f"and no longer in the replay buffer of {self.replay_endpoint}")
        return out

    def close(self) -> None:
        for s in (self._sub, self._dealer):
            if s is not None:
                s.close(linger=0)
        self._ctx.term()
