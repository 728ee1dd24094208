"""Errors the engine raises for bad requests. The server turns each into an error reply whose
`type` is the class name, and keeps serving."""


class EngineError(Exception):
    """Base: a request the engine refuses. The message says what was wrong."""


class BadRequest(EngineError):
    """Malformed or out-of-range parameters (types, token ids, step counts, empty prompts)."""


class ReloadInProgress(BadRequest):
    """A reload came while another is still running (from another front-end process, say)."""


class UnknownSession(EngineError):
    """The session id names no live session."""


class KVExhausted(EngineError):
    """The paged KV arena has no free blocks left for this request (nothing was changed)."""


class Unavailable(EngineError):
    """The feature does not exist on this backend (e.g. CUDA graphs on the CPU)."""


class Overloaded(EngineError):
    """The waiting queue is full: the request was not admitted. Retry later, or lower the load."""


class ShuttingDown(EngineError):
    """The server is stopping: queued requests are answered with this instead of being dropped."""


class Unauthorized(EngineError):
    """The request's `auth` token is missing or wrong (servers bound beyond loopback require one)."""


class DeadlineExceeded(EngineError):
    """The request's deadline_s passed before the work finished (its partial state was freed)."""


class ConfigError(ValueError):
    """A device / dtype / size combination the engine cannot run (the message names the knob)."""
