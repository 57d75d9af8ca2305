"""iotpipe's one error tree.

    IotpipeError
    ├── ConfigError                 bad settings / devices file / ids: fail fast at start-up
    ├── RetryableError              worth retrying: broker, Redis or cloud unreachable, HTTP 5xx/429
    └── PermanentError              retrying cannot help: HTTP 4xx, a rejected payload
        └── EnvelopeError           a message that failed sealing checks (counted by `reason`)
            ├── MalformedEnvelope   not JSON, wrong fields, unknown version/alg, oversize
            ├── UndecryptableToken  wrong key, tampered or truncated token, expired
            ├── TopicMismatch       sealed for another topic (a replay onto another device)
            ├── StaleMessage        older than the sender's replay window
            └── DuplicateMessage    (src, boot, seq) already seen: a QoS 1 redelivery, dropped quietly

`backoff`'s `giveup=` maps onto this split: retry RetryableError, give up on PermanentError.
"""

from __future__ import annotations

from typing import ClassVar


class IotpipeError(Exception):
    """Base of every error iotpipe raises on purpose."""


class ConfigError(IotpipeError):
    """Invalid configuration; the message names the offending field."""


class RetryableError(IotpipeError):
    """A dependency is unavailable for now."""


class PermanentError(IotpipeError):
    """The input or request is wrong; retrying cannot help."""


class EnvelopeError(PermanentError):
    reason: ClassVar[str] = "envelope"


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
