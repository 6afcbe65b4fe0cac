"""A Snapshot's filters are checked by the dataplane too: nothing configured may split a head."""

from __future__ import annotations

from kanal.contract import snapshot as snap
from kanal.contract.validate import validate


def snapshot_with(*filters: snap.Filter) -> snap.Snapshot:
    rule = snap.Rule(index=0, backends=(snap.Backend("a/b"),), filters=filters)
    return snap.Snapshot(routes=(snap.Route("a/r", rules=(rule,)),))


def test_header_values_with_cr_lf_are_refused() -> None:
    bad = snap.Filter("RequestHeaderModifier", request_header_modifier=snap.HeaderModifier(
        set=(snap.HeaderValue("X-A", "1\r\nX-Injected: 2"),)))
    assert validate(snapshot_with(bad)) == [
        "route a/r rule 0: filters: RequestHeaderModifier: header X-A value holds CR, LF or NUL"]


def test_unknown_variables_names_and_redirect_targets_are_refused() -> None:
    problems = validate(snapshot_with(
        snap.Filter("ResponseHeaderModifier", response_header_modifier=snap.HeaderModifier(
            add=(snap.HeaderValue("X A", "${nope}"),))),
        snap.Filter("RequestRedirect", request_redirect=snap.RequestRedirect(
            hostname="evil\r\n", path=snap.PathModifier("ReplaceFullPath", "/a b"),
            status_code=200)),
    ))
    assert len(problems) == 5, problems
    assert any("unknown variable ${nope}" in p for p in problems)


def test_good_filters_pass() -> None:
    good = snap.Filter("DirectResponse", direct_response=snap.DirectResponse(
        200, (snap.HeaderValue("Content-Type", "text/plain"),), "ok"))
    assert validate(snapshot_with(good)) == []


def test_framing_headers_are_the_proxys() -> None:
    smuggle = snap.Filter("RequestHeaderModifier", request_header_modifier=snap.HeaderModifier(
        add=(snap.HeaderValue("Content-Length", "0"), snap.HeaderValue("Transfer-Encoding",
                                                                         "chunked"))))
    assert validate(snapshot_with(smuggle)) == [
        "route a/r rule 0: filters: RequestHeaderModifier: header content-length is the "
        "proxy's to write",
        "route a/r rule 0: filters: RequestHeaderModifier: header transfer-encoding is the "
        "proxy's to write"]
