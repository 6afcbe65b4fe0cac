"""`kanal run` reading its files as a new user meets them: the same object twice, a Secret
edited to a certificate and key that do not load. Each case runs the real command line."""

from __future__ import annotations

import aiohttp
import trustme

from tests.conftest import free_port, upstream_yaml, wait_until
from tests.dataplane.test_tls_scenarios import https, serial, tls_route, tls_secret


def route(name: str, host: str, upstream: str) -> str:
    return (f"apiVersion: kanal.dev/v1alpha1\nkind: Route\nmetadata: {{name: {name}}}\n"
            f"spec:\n  hostnames: [{host}]\n  rules: [{{backends: [{{upstream: {upstream}}}]}}]\n")


async def backend_of(url: str, host: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url, headers={"Host": host}) as answer:
        assert answer.status == 200, await answer.text()
        return str((await answer.json())["backend"])


# --------------------------------------------------------------------------- duplicates


async def test_a_duplicate_object_is_refused_naming_both_files(kanal, backends):
    v1, v2 = await backends("v1"), await backends("v2")
    ups = upstream_yaml("v1", v1) + "---\n" + upstream_yaml("v2", v2)
    # Two new copies at start: the first in reading order serves, as `kanal validate` keeps.
    k = kanal({"ups.yaml": ups, "m.yaml": route("web", "app.test", "v1"),
               "n.yaml": route("web", "app.test", "v2")})
    assert await backend_of(k.url + "/", "app.test") == "v1"
    wait_until(lambda: any("n.yaml" in line and "m.yaml" in line and "duplicate" in line
                           for line in k.log().splitlines()), timeout=5)

    # A copy added later, before or after the served one in reading order, is refused:
    # the object that served keeps serving, and the log names both files.
    for name in ("z.yaml", "a.yaml"):
        k.write(name, route("web", "app.test", "v2"))
        wait_until(lambda name=name: any(
            name in line and "m.yaml" in line and "duplicate" in line and "Route default/web"
            in line for line in k.log().splitlines()), timeout=5)
        assert await backend_of(k.url + "/", "app.test") == "v1"

    # Once the served copy is gone, a remaining one takes over.
    version = k.version()
    for name in ("m.yaml", "n.yaml", "z.yaml"):
        (k.folder / name).unlink()
    k.wait_for_new_version(version)
    assert await backend_of(k.url + "/", "app.test") == "v2"


# --------------------------------------------------------------------------- a bad Secret


async def test_a_bad_secret_edit_keeps_the_last_good_certificate(kanal, backends):
    web = await backends("web")
    ca = trustme.CA()
    good, other = ca.issue_cert("app.tls.test"), ca.issue_cert("app.tls.test")
    tls_port = free_port()
    k = kanal({"up.yaml": upstream_yaml("web", web),
               "secret.yaml": tls_secret("app-tls", good),
               "route.yaml": tls_route("app", ["app.tls.test"], "web", "app-tls")},
              "--tls-listen", f"127.0.0.1:{tls_port}")
    response, got = await https(tls_port, "app.tls.test", ca)
    assert (response.status, got) == (200, serial(good))

    # The certificate of one pair with the key of another: they do not load together.
    good_crt = tls_secret("app-tls", good).split("  tls.key: |\n")[0]
    other_key = tls_secret("app-tls", other).split("  tls.key: |\n")[1]
    mismatched = f"{good_crt}  tls.key: |\n{other_key}"
    k.write("secret.yaml", mismatched)
    wait_until(lambda: "keeping the last good version of Secret default/app-tls" in k.log(),
               timeout=5)
    assert any("secret.yaml" in line and "not usable" in line for line in k.log().splitlines())
    response, got = await https(tls_port, "app.tls.test", ca)
    assert (response.status, got) == (200, serial(good))

    # A good edit afterwards is taken.
    version = k.version()
    k.write("secret.yaml", tls_secret("app-tls", other))
    k.wait_for_new_version(version)
    response, got = await https(tls_port, "app.tls.test", ca)
    assert (response.status, got) == (200, serial(other))
