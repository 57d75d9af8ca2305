"""iotpipe's one error tree.

    IotpipeError
    ├── ConfigError                 bad settings / devices file / ids: fail fast at start-up
    ├── RetryableError              worth retrying: broker, Redis or cloud unreachable, HTTP 5xx/429
    └── PermanentError              retrying cannot help: HTTP 4xx, a rejected payload
        ├── BrokerRefused           the broker refused a publish (`reason_code`, e.g. 0x87 not authorised)
        ├── SchemaError             a payload that is not what the contract (iotpipe._models) says
        └── EnvelopeError           a message that failed sealing checks (counted by `reason`)
            ├── MalformedEnvelope   not JSON, wrong fields, unknown version/alg, oversize
            ├── UndecryptableToken  wrong key, tampered or truncated token, expired
            ├── TopicMismatch       sealed for another topic (a replay onto another device)
            ├── StaleMessage        older than the sender's replay window
            └── DuplicateMessage    (src, boot, seq) already seen: a QoS 1 redelivery, dropped quietly

What the bus does with a handler's error (iotpipe._bus): RetryableError holds the whole batch
unacknowledged and retries it with capped, jittered backoff; PermanentError concerns one message,
which is dead-lettered and acknowledged while its batch-mates proceed; any other exception is a
bug: retried a bounded number of times, then the failing message is isolated and dead-lettered.
"""

from __future__ import annotations

from typing import ClassVar


class IotpipeError(Exception):
    """Base of every error iotpipe raises on purpose."""


class ConfigError(IotpipeError):
    """Invalid configuration; the message names the offending field."""


class RetryableError(IotpipeError):
    """A dependency is unavailable for now. `dependency` names it in the one log line an outage
    gets; `retry_after` (s) is the dependency's own pacing (HTTP Retry-After), when it gave one."""

    def __init__(self, message: str, *, dependency: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.dependency = dependency
        self.retry_after = retry_after


class PermanentError(IotpipeError):
    """The input or request is wrong; retrying cannot help. `reason` is the label it is counted by."""

    reason: ClassVar[str] = "permanent"


class BrokerRefused(PermanentError):
    reason = "broker_refused"

    def __init__(self, topic: str, reason_code: int) -> None:
        super().__init__(f"broker refused publish to {topic} (reason code {reason_code:#x})")
        self.topic = topic
        self.reason_code = reason_code


class SchemaError(PermanentError):
    reason = "schema"
    # Who sent the offending payload ({"src", "boot", "seq"}), once the envelope around it was verified.
    sender: dict[str, object] | None = None


class EnvelopeError(PermanentError):
    reason = "envelope"


class MalformedEnvelope(EnvelopeError):
    reason = "malformed"


class UndecryptableToken(EnvelopeError):
    reason = "undecryptable"


class TopicMismatch(EnvelopeError):
    reason = "topic_mismatch"


class StaleMessage(EnvelopeError):
    reason = "stale"


class DuplicateMessage(EnvelopeError):
    reason = "duplicate"
