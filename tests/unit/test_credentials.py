"""The one credential rule both fronts use: ``Bearer <key>`` and nothing else."""

from __future__ import annotations

import pytest

from loraplex.server.auth.credentials import bearer_key, credential_from_pairs


@pytest.mark.parametrize(
    "value, key",
    [
        ("Bearer sk-abc", "sk-abc"),
        ("bearer sk-abc", "sk-abc"),
        ("BEARER   sk-abc  ", "sk-abc"),
        ("sk-abc", None),  # a bare key is not accepted on either front
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer a b", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_key(value, key):
    assert bearer_key(value) == key


def test_the_first_authorization_pair_counts_and_names_are_case_insensitive():
    assert credential_from_pairs([("x-other", "Bearer no"), ("Authorization", "Bearer yes"), ("authorization", "Bearer later")]) == "yes"
    assert credential_from_pairs([("user-agent", "grpc")]) is None
    assert credential_from_pairs(None) is None
