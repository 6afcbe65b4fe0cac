"""Egress decisions without sockets: host matching, ports, address classification, auth."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kanal.contract.names import wildcard_public_suffix
from kanal.contract.snapshot import EgressPolicy, EgressRule, Route, Snapshot
from kanal.dataplane.egress import (
    EgressRules,
    InvalidHost,
    check_addresses,
    classify,
    host_matches,
    ip_literal,
    normalize_host,
)

# --------------------------------------------------------------------------- hosts

labels = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=8).map(
        lambda text: text.rstrip("-")),
)
names = st.lists(labels, min_size=1, max_size=4).map(".".join)


@pytest.mark.parametrize(("pattern", "host", "expected"), [
    ("api.partner.net", "api.partner.net", True),
    ("api.partner.net", "x.api.partner.net", False),
    ("api.partner.net", "partner.net", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "badexample.com", False),
    ("*.example.com", "example.com.evil.net", False),
])
def test_host_matching(pattern: str, host: str, expected: bool) -> None:
    assert host_matches(pattern, host) is expected


@given(sub=labels, domain=names)
def test_a_wildcard_matches_every_subdomain_and_never_the_domain_itself(sub: str, domain: str) -> None:
    assert host_matches(f"*.{domain}", f"{sub}.{domain}")
    assert not host_matches(f"*.{domain}", domain)
    assert not host_matches(f"*.{domain}", f"{sub}{domain}")


@given(a=names, b=names)
def test_an_exact_name_matches_itself_only(a: str, b: str) -> None:
    assert host_matches(a, b) is (a == b)


def test_wildcards_across_public_suffixes_are_recognised() -> None:
    assert wildcard_public_suffix("*.com") == "com"
    assert wildcard_public_suffix("*.co.uk") == "co.uk"
    assert wildcard_public_suffix("*.github.io") == "github.io"
    assert wildcard_public_suffix("*.internal") == "internal"  # every TLD is public
    assert wildcard_public_suffix("*.example.com") is None
    assert wildcard_public_suffix("*.example.co.uk") is None
    assert wildcard_public_suffix("co.uk") is None  # exact names are never refused
    # From the whole Public Suffix List, not a hand-picked part of it.
    assert wildcard_public_suffix("*.s3.amazonaws.com") == "s3.amazonaws.com"
    assert wildcard_public_suffix("*.pages.dev") == "pages.dev"
    assert wildcard_public_suffix("*.kanal.pages.dev") is None


def test_hosts_are_normalised_or_refused() -> None:
    assert normalize_host("Example.COM.") == "example.com"
    assert normalize_host("[::FFFF:127.0.0.1]") == "::ffff:127.0.0.1"
    for bad in ("", "a..b", "exa mple.com", "-a.com", "a" * 64 + ".com", "[zz::1]", "x%41.com"):
        with pytest.raises(InvalidHost):
            normalize_host(bad)


@pytest.mark.parametrize(("host", "address"), [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("169.254.169.254", "169.254.169.254"),
    ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
    ("example.com", None),
    ("1a.example.com", None),
])
def test_ip_literals_include_the_numeric_forms_inet_aton_takes(host: str, address: str | None) -> None:
    assert ip_literal(host) == (ipaddress.ip_address(address) if address else None)


def test_a_numeric_last_label_that_is_no_address_is_refused() -> None:
    for host in ("foo.123", "1.2.3.4.5", "256.1.1.1", "08"):
        with pytest.raises(InvalidHost):
            ip_literal(host)


# --------------------------------------------------------------------------- addresses

PRIVATE = [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.0.1", "172.31.255.255",
    "192.168.1.1", "169.254.169.254", "100.64.0.1", "100.127.255.255", "0.0.0.0",
    "224.0.0.1", "255.255.255.255", "::1", "::", "fd00::1", "fc00::1", "fe80::1",
    "::ffff:127.0.0.1", "::ffff:10.1.2.3", "::ffff:169.254.169.254", "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "::127.0.0.1", "2002:7f00:1::1", "2002:a00:1::1",
    "ff02::1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.128.0.1", "172.32.0.1",
          "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("address", PRIVATE)
def test_private_addresses_are_classified(address: str) -> None:
    assert classify(address) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert classify(address) is None


def test_the_reasons_say_what_an_address_is() -> None:
    assert classify("169.254.169.254") == "a link-local address (cloud metadata)"
    assert classify("100.64.0.1") == "a carrier-grade NAT (RFC 6598) address"
    assert classify("::ffff:127.0.0.1") == "the IPv4-mapped form of 127.0.0.1, a loopback address"
    assert classify("64:ff9b::7f00:1") == "the NAT64 form of 127.0.0.1, a loopback address"


v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


@given(v4)
def test_every_ipv6_form_of_an_ipv4_address_is_classified_like_it(address: ipaddress.IPv4Address) -> None:
    private = classify(address) is not None
    packed = address.packed
    mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + packed)
    nat64 = ipaddress.IPv6Address(bytes.fromhex("0064ff9b") + b"\0" * 8 + packed)
    six_to_four = ipaddress.IPv6Address(b"\x20\x02" + packed + b"\0" * 10)
    assert (classify(mapped) is not None) is private
    assert (classify(nat64) is not None) is private
    assert (classify(six_to_four) is not None) is private


@given(v4)
def test_the_classification_agrees_with_the_standard_library_on_ipv4(address: ipaddress.IPv4Address) -> None:
    # Whatever Python calls global and not multicast is public here too, and the
    # reverse: a stricter or looser table would show up as a disagreement.
    if address in ipaddress.IPv4Network("192.0.0.0/24"):
        return  # a few of its /32s became global in newer Pythons; all are private here
    expected_public = address.is_global and not address.is_multicast
    assert (classify(address) is None) is expected_public


@given(st.lists(v4, min_size=1, max_size=5))
def test_one_private_address_among_the_resolved_ones_refuses_them_all(addresses) -> None:
    any_private = any(classify(a) is not None for a in addresses)
    assert (check_addresses(addresses, allow_private=False) is not None) is any_private
    assert check_addresses(addresses, allow_private=True) is None


# --------------------------------------------------------------------------- policies


def policy(name: str = "p", allow=(), deny=(), **kw) -> EgressPolicy:
    return EgressPolicy(key=f"default/{name}", allow=tuple(allow), deny=tuple(deny), **kw)


def rules(*policies: EgressPolicy, mesh: tuple[str, ...] = ()) -> EgressRules:
    return EgressRules(policies, mesh)


def test_without_a_policy_only_mesh_services_pass() -> None:
    r = rules(mesh=("orders.shop", "*.mesh.local"))
    assert r.decide("orders.shop", 80).mesh
    assert r.decide("a.mesh.local", 8080).mesh
    denied = r.decide("example.com", 80)
    assert not denied.allowed
    assert "no EgressPolicy in namespace default" in denied.reason


def test_allow_rules_name_hosts_and_ports() -> None:
    r = rules(policy(allow=[EgressRule("*.example.com", (443,)), EgressRule("api.partner.net", (80, 443))]))
    assert r.decide("www.example.com", 443).allowed
    assert not r.decide("example.com", 443).allowed
    wrong_port = r.decide("www.example.com", 80)
    assert not wrong_port.allowed and "port 80 is not allowed" in wrong_port.reason
    assert r.decide("api.partner.net", 80).allowed
    assert not r.decide("api.partner.net", 8080).allowed
    assert not r.decide("other.net", 443).allowed


def test_deny_wins_over_allow_across_policies_and_over_mesh() -> None:
    r = rules(
        policy("a", allow=[EgressRule("*.example.com", (80, 443))]),
        policy("b", deny=[EgressRule("ads.example.com")]),
        mesh=("ads.example.com",),
    )
    verdict = r.decide("ads.example.com", 443)
    assert not verdict.allowed and "default/b" in verdict.reason
    assert r.decide("www.example.com", 443).allowed


def test_deny_rules_with_ports_deny_those_ports_only() -> None:
    r = rules(policy(allow=[EgressRule("api.partner.net", (80, 443))],
                     deny=[EgressRule("api.partner.net", (80,))]))
    assert not r.decide("api.partner.net", 80).allowed
    assert r.decide("api.partner.net", 443).allowed


def test_ip_literals_are_never_allowed_by_names() -> None:
    r = rules(policy(allow=[EgressRule("localhost", (80,))], allow_private_networks=True))
    for literal in ("127.0.0.1", "2130706433", "::ffff:127.0.0.1", "8.8.8.8", "169.254.169.254"):
        assert not r.decide(literal, 80).allowed, literal
    assert "link-local" in r.decide("169.254.169.254", 80).reason


def test_private_networks_follow_the_policy_that_allows() -> None:
    r = rules(policy("open", allow=[EgressRule("a.test", (80,))], allow_private_networks=True),
              policy("closed", allow=[EgressRule("b.test", (80,))]))
    assert r.decide("a.test", 80).allow_private
    assert not r.decide("b.test", 80).allow_private


def test_connect_to_a_mesh_host_is_not_a_mesh_request() -> None:
    r = rules(mesh=("orders.shop",))
    assert not r.decide("orders.shop", 443, connect=True).allowed


def test_a_wildcard_across_a_public_suffix_in_a_snapshot_is_ignored() -> None:
    r = rules(policy(allow=[EgressRule("*.com", (443,))]))
    assert r.ignored == ("default/p: *.com",)
    assert not r.decide("example.com", 443).allowed


def test_policies_of_other_namespaces_and_ingress_routes_do_not_count() -> None:
    snapshot = Snapshot(
        routes=(Route(key="default/in", hostnames=("in.test",)),
                Route(key="default/mesh", hostnames=("orders.shop",), gateways=("mesh",))),
        egress_policies=(policy(allow=[EgressRule("a.test", (80,))]),
                         EgressPolicy(key="other/p", allow=(EgressRule("b.test", (80,)),))),
    )
    r = EgressRules.from_snapshot(snapshot)
    assert r.decide("a.test", 80).allowed
    assert not r.decide("b.test", 80).allowed
    assert r.is_mesh("orders.shop") and not r.is_mesh("in.test")


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_credentials() -> None:
    r = rules(policy(allow=[EgressRule("a.test", (80,))], basic_auth=(("robot", "s3cret"),)))
    assert r.auth_required
    assert r.authenticate(basic("robot", "s3cret"))
    assert r.authenticate(b"basic " + base64.b64encode(b"robot:s3cret"))
    for wrong in (None, basic("robot", "nope"), basic("robo", "s3cret"), b"Bearer x",
                  b"Basic !!!", b"Basic " + base64.b64encode(b"robot:s3cret:")):
        assert not r.authenticate(wrong), wrong
    assert rules(policy()).authenticate(None)


def test_anonymize_holds_when_any_policy_says_so() -> None:
    assert rules(policy("a"), policy("b", anonymize=True)).anonymize
    assert not rules(policy("a")).anonymize


@pytest.mark.parametrize("host", ["*.com", "*.co.uk", "*.github.io"])
def test_the_model_refuses_an_allow_wildcard_across_a_public_suffix(host: str) -> None:
    from pydantic import ValidationError

    from kanal.operator.manifests import describe_validation_error
    from kanal.operator.models import EgressPolicy as EgressPolicyModel

    document = {"apiVersion": "kanal.dev/v1alpha1", "kind": "EgressPolicy",
                "metadata": {"name": "p"}, "spec": {"allow": [{"host": "a.test"}, {"host": host}]}}
    with pytest.raises(ValidationError) as caught:
        EgressPolicyModel.model_validate(document)
    [(path, message)] = describe_validation_error(caught.value)
    assert path == "spec"
    assert message.startswith(f"allow[1].host: {host} is a wildcard across the public suffix")
    document["spec"] = {"allow": [{"host": "*.example.co.uk"}], "deny": [{"host": host}]}
    EgressPolicyModel.model_validate(document)  # deny wildcards may be as wide as they like
