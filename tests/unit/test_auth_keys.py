"""API key file and key ring: hashes only, globs, revocation, reload on change, rate limits."""

import os
import time

import pytest

from loraplex.server.auth import KeyFile, KeyRing, hash_secret
from loraplex.server.errors import PermissionDenied, RateLimited, RequestInvalid, Unauthenticated


def test_add_stores_only_the_hash_and_authenticates(tmp_path):
    keys = KeyFile(tmp_path / "keys.yaml")
    secret, key = keys.add("alice", "user", ["sent*", "SmolLM2-135M-Instruct"])
    text = (tmp_path / "keys.yaml").read_text()
    assert secret not in text and hash_secret(secret) in text
    assert oct(os.stat(tmp_path / "keys.yaml").st_mode & 0o777) == "0o600"
    ring = KeyRing(tmp_path / "keys.yaml")
    found = ring.authenticate(secret)
    assert found.name == "alice" and found.may_use("sentiment") and found.may_use("SmolLM2-135M-Instruct")
    assert not found.may_use("extract")
    with pytest.raises(Unauthenticated, match="invalid API key"):
        ring.authenticate(secret + "x")
    with pytest.raises(Unauthenticated, match="missing API key"):
        ring.authenticate(None)
    with pytest.raises(PermissionDenied, match="needs role 'admin'"):
        ring.require_admin(found)


def test_bad_inputs_are_refused(tmp_path):
    keys = KeyFile(tmp_path / "keys.yaml")
    keys.add("a", "admin", ["*"])
    with pytest.raises(RequestInvalid, match="already used"):
        keys.add("a", "user", ["*"])
    with pytest.raises(RequestInvalid, match="role 'root'"):
        keys.add("b", "root", ["*"])
    with pytest.raises(RequestInvalid, match="no key named 'zz'"):
        keys.revoke("zz")
    (tmp_path / "broken.yaml").write_text("keys: [{name: x}]")
    with pytest.raises(RequestInvalid, match="malformed|needs role|adapters must be a list"):
        KeyFile(tmp_path / "broken.yaml").load()


def test_revocation_is_picked_up_when_the_file_changes(tmp_path):
    keys = KeyFile(tmp_path / "keys.yaml")
    secret, _ = keys.add("bob", "user", ["*"])
    ring = KeyRing(tmp_path / "keys.yaml")
    assert ring.authenticate(secret).name == "bob"
    time.sleep(1.1)  # the ring stats the file at most once a second
    keys.revoke("bob")
    with pytest.raises(Unauthenticated):
        ring.authenticate(secret)


def test_single_key_mode_and_disabled_mode():
    assert KeyRing().authenticate(None) is None  # no keys configured: auth is off
    ring = KeyRing(single_key="s3cret")
    assert ring.authenticate("s3cret").is_admin
    with pytest.raises(Unauthenticated):
        ring.authenticate("other")


def test_rate_limits_with_retry_after(tmp_path):
    keys = KeyFile(tmp_path / "keys.yaml")
    secret, _ = keys.add("r", "user", ["*"], requests_per_minute=2, tokens_per_minute=100)
    ring = KeyRing(tmp_path / "keys.yaml")
    key = ring.authenticate(secret)
    ring.admit(key)
    ring.admit(key)
    with pytest.raises(RateLimited, match="limit of 2 requests per minute") as info:
        ring.admit(key)
    assert 0 < info.value.retry_after <= 60
    secret2, _ = keys.add("t", "user", ["*"], tokens_per_minute=100)
    time.sleep(1.1)
    key2 = ring.authenticate(secret2)
    ring.admit(key2)
    ring.record_tokens(key2, 150)
    with pytest.raises(RateLimited, match="used 150 tokens in the last minute; its limit is 100"):
        ring.admit(key2)


def test_adapters_must_be_a_list_not_a_string(tmp_path):
    (tmp_path / "keys.yaml").write_text(f"keys:\n- name: x\n  role: user\n  adapters: 'team-*'\n  sha256: {'a' * 64}\n")
    with pytest.raises(RequestInvalid, match="adapters must be a list"):
        KeyFile(tmp_path / "keys.yaml").load()
