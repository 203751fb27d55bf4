"""Dead letters: what was rejected, with the reason, where an operator can find it."""

from __future__ import annotations

import base64
import logging
import threading
import time
from typing import IO, Any, Protocol

import orjson

from devices.contract import REJECTED_SEGMENT, rejected_topic
from ingest.decode import Rejection

log = logging.getLogger(__name__)

#: Largest part of a rejected payload copied into its dead letter.
MAX_COPY_BYTES = 64 * 1024
#: Longest part of the original topic copied into a dead letter (MQTT allows 65,535 bytes).
MAX_TOPIC_CHARS = 1024
#: Dead letters awaiting the broker's PUBACK before new ones wait for them.
MAX_PENDING_BYTES = 8 << 20


def dead_letter_document(rej: Rejection) -> dict[str, Any]:
    payload = rej.payload[:MAX_COPY_BYTES]
    try:
        text: str = payload.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        text = base64.b64encode(payload).decode("ascii")
        encoding = "base64"
    return {
        "reason": rej.code,
        "detail": rej.reason,
        "topic": rej.topic[:MAX_TOPIC_CHARS],
        "topic_truncated": len(rej.topic) > MAX_TOPIC_CHARS,
        "sample_index": rej.sample_index,
        "rejected_at": int(time.time() * 1000),
        "payload_bytes": len(rej.payload),
        "payload_truncated": len(rej.payload) > MAX_COPY_BYTES,
        "payload_encoding": encoding,
        "payload": text,
    }


class DeadLetter(Protocol):
    def send(self, rejection: Rejection) -> None: ...

    def flush(self, timeout: float) -> bool:
        """True once everything sent so far is durably delivered."""
        ...


class NoDeadLetter:
    def send(self, rejection: Rejection) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        return True


class FileDeadLetter:
    """JSON lines appended to a file, flushed at ``flush``."""

    def __init__(self, path: str) -> None:
        self._fh: IO[bytes] = open(path, "ab")  # noqa: SIM115 - kept open for the run
        self._lock = threading.Lock()

    def send(self, rejection: Rejection) -> None:
        with self._lock:
            self._fh.write(orjson.dumps(dead_letter_document(rejection)) + b"\n")

    def flush(self, timeout: float) -> bool:
        with self._lock:
            self._fh.flush()
        return True

    def close(self) -> None:
        self._fh.close()


class MqttDeadLetter:
    """Publishes each dead letter at QoS 1 to ``<prefix>/_rejected/<site>/<line>/<device>/...``.

    ``flush`` waits for the broker's PUBACKs: the rejected message is only
    acknowledged once its dead letter is safe with the broker.
    """

    def __init__(self, publish: Any, prefix: str) -> None:
        self._publish = publish  # (topic, payload: bytes, qos) -> paho MQTTMessageInfo
        self.prefix = prefix
        self._pending: list[Any] = []
        self._pending_bytes = 0
        self._all_confirmed = True  # since the last flush() by the writer
        self._lock = threading.Lock()
        self._wait_lock = threading.Lock()
        self.failed = 0

    def send(self, rejection: Rejection) -> None:
        topic = (
            rejected_topic(self.prefix, rejection.topic)
            if rejection.topic
            else f"{self.prefix}/{REJECTED_SEGMENT}/_write"
        )
        body = orjson.dumps(dead_letter_document(rejection))
        info = self._publish(topic, body, 1)
        with self._lock:
            self._pending.append(info)
            self._pending_bytes += len(body)
            backlog = self._pending_bytes > MAX_PENDING_BYTES
        if backlog:  # bound what waits in the MQTT client's queue
            with self._wait_lock:
                confirmed = self._wait(timeout=10.0)
                with self._lock:
                    self._all_confirmed &= confirmed

    def flush(self, timeout: float) -> bool:
        # _wait_lock: a wait in send() that took some of these dead letters has finished
        # (and recorded its outcome) before this one answers.
        with self._wait_lock:
            confirmed = self._wait(timeout)
            with self._lock:
                confirmed &= self._all_confirmed
                self._all_confirmed = True
        return confirmed

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            pending, self._pending = self._pending, []
            self._pending_bytes = 0
        ok = True
        for info in pending:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:  # not queued: disconnected, too large
                log.warning("dead letter not delivered: %s", exc)
                ok = False
                continue
            if not info.is_published():
                ok = False
        if not ok:
            self.failed += 1
        return ok
