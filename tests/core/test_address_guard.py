"""The webhook and image-fetch address guard: IPv6 addresses that carry an IPv4 address."""

from __future__ import annotations

import pytest

from fategen.core.webhooks import address_refusal


@pytest.mark.parametrize(
    ("address", "inner"),
    [
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # NAT64 to the metadata service
        ("2002:0a00:0001::1", "10.0.0.1"),  # 6to4
        ("::10.0.0.1", "10.0.0.1"),  # IPv4-compatible
        ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
    ],
)
def test_ipv6_addresses_carrying_a_private_ipv4_are_refused(address: str, inner: str) -> None:
    refusal = address_refusal("cdn.example", [address])
    assert refusal is not None and inner in refusal
    assert address_refusal("cdn.example", ["64:ff9b::101:101"]) is None  # 1.1.1.1
