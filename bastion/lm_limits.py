"""How long a language model's answer may be: one limit for the wire protocol, the node's config, the CLI, the SDK
and the generator, so that no layer accepts what the next refuses (#15: the protocol took 4096, the CLI said 2048).

Base layer (no onnxruntime, no pyzmq): the SDK's protocol module and the runtime both import it.
"""

from __future__ import annotations

from bastion.errors import ConfigError

MAX_NEW_TOKENS = 2048


def check_max_new_tokens(value: object) -> int:
    """``value`` as a token count in 1..MAX_NEW_TOKENS, else ConfigError naming the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise ConfigError(f"max_new_tokens must be 1..{MAX_NEW_TOKENS}, got {value!r}", "ask for a shorter answer")
    return value
