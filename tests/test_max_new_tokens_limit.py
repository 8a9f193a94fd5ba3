"""One ``max_new_tokens`` limit for the wire protocol, the node's config, the CLI, the SDK and the generator (#15):
the protocol accepted 4096 while the CLI and the generator said 1..2048."""

import time

import pytest
from pydantic import ValidationError

from bastion.edge.client import Client
from bastion.edge.config import NodeConfig
from bastion.edge.protocol import AskRequest
from bastion.errors import ConfigError
from bastion.lm_limits import MAX_NEW_TOKENS
from bastion.runtime.lm import check_generation
from conftest import run_cli


def test_the_protocol_and_the_generator_share_one_limit():
    assert AskRequest(op="ask", prompt="x", max_new_tokens=MAX_NEW_TOKENS).max_new_tokens == MAX_NEW_TOKENS
    with pytest.raises(ValidationError):
        AskRequest(op="ask", prompt="x", max_new_tokens=MAX_NEW_TOKENS + 1)
    check_generation(max_new_tokens=MAX_NEW_TOKENS)
    with pytest.raises(ConfigError, match=f"1..{MAX_NEW_TOKENS}"):
        check_generation(max_new_tokens=MAX_NEW_TOKENS + 1)
    high = NodeConfig.model_fields["lm_max_new_tokens"].metadata
    assert any(getattr(m, "le", None) == MAX_NEW_TOKENS for m in high)


def test_the_sdk_refuses_past_the_limit_before_sending():
    with Client("tcp://127.0.0.1:9", timeout_s=5, retries=0) as client:  # nothing listens: a send would wait 5 s
        started = time.monotonic()
        with pytest.raises(ConfigError, match=f"max_new_tokens must be 1..{MAX_NEW_TOKENS}"):
            client.ask("hello", max_new_tokens=MAX_NEW_TOKENS + 1)
        with pytest.raises(ConfigError, match="max_new_tokens"):
            client.ask("hello", max_new_tokens=0)
        assert time.monotonic() - started < 1


def test_the_cli_says_the_same_limit():
    proc = run_cli("ask", "--node", "tcp://127.0.0.1:9", "hello", "--max-new-tokens", str(MAX_NEW_TOKENS + 1))
    assert proc.returncode == 1 and f"max_new_tokens must be 1..{MAX_NEW_TOKENS}" in proc.stderr, proc.stderr
    assert "no answer" not in proc.stderr and "Traceback" not in proc.stderr
