"""Scenario: REST/JSON to gRPC transcoding through a real `kanal run`.

A descriptor set is made at test time by grpcio-tools' protoc from a proto with
google.api.http annotations; a grpcio server serves the service (generic handlers with
message classes from the same descriptors); clients send plain JSON over HTTP/1.1."""

from __future__ import annotations

import base64
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from tests.conftest import free_port

HTTP_PROTO = """\
syntax = "proto3";
package google.api;
message HttpRule {
  string selector = 1;
  oneof pattern {
    string get = 2; string put = 3; string post = 4; string delete = 5; string patch = 6;
    CustomHttpPattern custom = 8;
  }
  string body = 7;
  string response_body = 12;
  repeated HttpRule additional_bindings = 11;
}
message CustomHttpPattern { string kind = 1; string path = 2; }
"""

ANNOTATIONS_PROTO = """\
syntax = "proto3";
package google.api;
import "google/api/http.proto";
import "google/protobuf/descriptor.proto";
extend google.protobuf.MethodOptions { HttpRule http = 72295728; }
"""

SHOP_PROTO = """\
syntax = "proto3";
package shop.v1;
import "google/api/annotations.proto";
service Books {
  rpc GetBook(GetBookRequest) returns (Book) {
    option (google.api.http) = { get: "/v1/shelves/{shelf}/books/{book_id}" };
  }
  rpc CreateBook(CreateBookRequest) returns (Book) {
    option (google.api.http) = { post: "/v1/shelves/{shelf}/books" body: "book" };
  }
  rpc Hidden(GetBookRequest) returns (Book);
  rpc Deadline(GetBookRequest) returns (Book) {
    option (google.api.http) = { get: "/v1/deadline" };
  }
}
message Book { int64 id = 1; string title = 2; string shelf_name = 3; repeated string tags = 4; }
message GetBookRequest { string shelf = 1; int64 book_id = 2; string view = 3; }
message CreateBookRequest { string shelf = 1; Book book = 2; }
"""


def descriptor_set(folder: Path) -> bytes:
    from grpc_tools import protoc

    (folder / "google" / "api").mkdir(parents=True)
    (folder / "google" / "api" / "http.proto").write_text(HTTP_PROTO)
    (folder / "google" / "api" / "annotations.proto").write_text(ANNOTATIONS_PROTO)
    (folder / "shop.proto").write_text(SHOP_PROTO)
    include = Path(protoc.__file__).parent / "_proto"
    out = folder / "descriptors.pb"
    code = protoc.main(["protoc", f"-I{folder}", f"-I{include}", "--include_imports",
                        f"--descriptor_set_out={out}", str(folder / "shop.proto")])
    assert code == 0
    return out.read_bytes()


def message_classes(data: bytes) -> dict[str, Any]:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    files = descriptor_pb2.FileDescriptorSet.FromString(data)
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"shop.v1.{name}"))
            for name in ("Book", "GetBookRequest", "CreateBookRequest")}


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Iterator[tuple[int, bytes]]:
    data = descriptor_set(tmp_path_factory.mktemp("protos"))
    classes = message_classes(data)
    book = classes["Book"]

    def get_book(request: Any, context: grpc.ServicerContext) -> Any:
        if request.book_id == 404:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no book {request.book_id}")
        return book(id=request.book_id, title=f"{request.shelf}-{request.view}",
                    shelf_name=request.shelf)

    def create_book(request: Any, context: grpc.ServicerContext) -> Any:
        created = book()
        created.CopyFrom(request.book)
        created.id = 7
        created.shelf_name = request.shelf
        return created

    def deadline(request: Any, context: grpc.ServicerContext) -> Any:
        """The seconds left of the deadline the call came with, or "none"."""
        left = context.time_remaining()  # grpcio: None or a huge number without one
        return book(title="none" if left is None or left > 1e9 else f"{left:f}")

    def handler(function: Any, request: str) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            function, request_deserializer=classes[request].FromString,
            response_serializer=book.SerializeToString)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("shop.v1.Books", {
        "GetBook": handler(get_book, "GetBookRequest"),
        "CreateBook": handler(create_book, "CreateBookRequest"),
        "Hidden": handler(get_book, "GetBookRequest"),
        "Deadline": handler(deadline, "GetBookRequest"),
    }),))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield port, data
    server.stop(grace=None)


def upstream_yaml(port: int) -> str:
    return textwrap.dedent(f"""\
        apiVersion: kanal.dev/v1alpha1
        kind: Upstream
        metadata: {{name: books}}
        spec:
          protocol: H2C
          endpoints: [{{address: 127.0.0.1, port: {port}}}]
        """)


@pytest.fixture(scope="module")
def proxy(module_kanal, shop, tmp_path_factory):
    port, data = shop
    descriptor_file = tmp_path_factory.mktemp("descriptor-file") / "shop.pb"
    descriptor_file.write_bytes(data)
    files = {
        "secret.yaml": textwrap.dedent(f"""\
            apiVersion: v1
            kind: Secret
            metadata: {{name: shop-descriptors}}
            data:
              descriptors.pb: {base64.b64encode(data).decode()}
            """),
        "configmap.yaml": textwrap.dedent(f"""\
            apiVersion: v1
            kind: ConfigMap
            metadata: {{name: shop-protos}}
            binaryData:
              shop.pb: {base64.b64encode(data).decode()}
            """),
        "upstream.yaml": upstream_yaml(port),
        "route.yaml": textwrap.dedent(f"""\
            apiVersion: kanal.dev/v1alpha1
            kind: Route
            metadata: {{name: books}}
            spec:
              rules:
                - matches: [{{path: {{type: PathPrefix, value: /v1}},
                              headers: [{{name: x-descriptors, value: configmap}}]}}]
                  backends: [{{upstream: books}}]
                  grpcTranscoder: {{descriptorConfigMapName: shop-protos, descriptorKey: shop.pb}}
                - matches: [{{path: {{type: PathPrefix, value: /v1}},
                              headers: [{{name: x-descriptors, value: file}}]}}]
                  backends: [{{upstream: books}}]
                  grpcTranscoder: {{descriptorFile: {descriptor_file}}}
                - matches: [{{path: {{type: PathPrefix, value: /v1}},
                              headers: [{{name: x-bound, value: route}}]}}]
                  backends: [{{upstream: books}}]
                  timeout: 2s
                  grpcTranscoder: {{descriptorSecretName: shop-descriptors}}
                - matches: [{{path: {{type: PathPrefix, value: /v1}},
                              headers: [{{name: x-bound, value: try}}]}}]
                  backends: [{{upstream: books}}]
                  timeout: 5s
                  retries: {{attempts: 1, perTryTimeout: 1500ms}}
                  grpcTranscoder: {{descriptorSecretName: shop-descriptors}}
                - matches: [{{path: {{type: PathPrefix, value: /v1}}}}]
                  backends: [{{upstream: books}}]
                  grpcTranscoder: {{descriptorSecretName: shop-descriptors}}
            """),
    }
    return module_kanal(files)


async def call(proxy, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(
            method, proxy.url + path, json=body, headers=headers) as answer:
        assert answer.headers["Content-Type"] == "application/json"
        return answer.status, await answer.json()


async def test_a_get_with_path_and_query_parameters(proxy):
    status, body = await call(proxy, "GET", "/v1/shelves/fiction/books/12?view=full")
    assert status == 200
    assert body == {"id": "12", "title": "fiction-full", "shelfName": "fiction"}


async def test_a_post_with_a_body_field(proxy):
    status, body = await call(proxy, "POST", "/v1/shelves/sf/books",
                              {"title": "Dune", "tags": ["classic"]})
    assert status == 200
    assert body == {"id": "7", "title": "Dune", "shelfName": "sf", "tags": ["classic"]}


async def test_grpc_errors_become_http_statuses(proxy):
    status, body = await call(proxy, "GET", "/v1/shelves/x/books/404")
    assert (status, body) == (404, {"code": 5, "message": "no book 404"})
    status, body = await call(proxy, "GET", "/v1/shelves/x/books/notanumber")
    assert status == 400 and body["code"] == 3


@pytest.mark.parametrize(("bound", "low", "high"), [
    ("route", 1.0, 2.0),  # the rule's 2s timeout
    ("try", 0.5, 1.5),    # the per-try timeout (1.5s), shorter than the rule's 5s
])
async def test_the_grpc_call_is_told_the_rules_timeout(proxy, bound, low, high):
    """As a proxied gRPC call is: the server gets a `grpc-timeout`, so it gives up no
    later than the proxy stops waiting for it."""
    status, body = await call(proxy, "GET", "/v1/deadline", headers={"x-bound": bound})
    assert status == 200
    # grpcio reads its deadline back through a wall clock: allow it a little slack.
    assert low < float(body["title"]) <= high + 0.3


async def test_a_rule_without_timeouts_sends_no_deadline(proxy):
    status, body = await call(proxy, "GET", "/v1/deadline")
    assert (status, body) == (200, {"title": "none"})


async def test_a_method_without_annotation_is_not_exposed(proxy):
    status, body = await call(proxy, "GET", "/v1/Hidden")
    assert status == 404 and body["code"] == 5


async def test_transcoding_for_an_http2_client(proxy):
    import httpx

    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        answer = await client.post(proxy.url + "/v1/shelves/h2/books", json={"title": "T"})
    assert answer.http_version == "HTTP/2" and answer.status_code == 200
    assert answer.json() == {"id": "7", "title": "T", "shelfName": "h2"}


@pytest.mark.parametrize("source", ["configmap", "file"])
async def test_the_descriptor_set_from_a_config_map_or_a_file(proxy, source):
    status, body = await call(proxy, "GET", "/v1/shelves/cm/books/3",
                              headers={"x-descriptors": source})
    assert (status, body) == (200, {"id": "3", "title": "cm-", "shelfName": "cm"})


async def test_a_relative_descriptor_file_is_read_when_it_appears(kanal, shop):
    """`descriptorFile` relative to the manifest's folder: missing at first (the rule
    answers UNAVAILABLE as JSON), then written there, and `kanal run` reloads."""
    import asyncio

    port, data = shop
    route = textwrap.dedent("""\
        apiVersion: kanal.dev/v1alpha1
        kind: Route
        metadata: {name: books}
        spec:
          rules:
            - backends: [{upstream: books}]
              grpcTranscoder: {descriptorFile: shop.pb}
        """)
    k = kanal({"upstream.yaml": upstream_yaml(port), "route.yaml": route})
    status, body = await call(k, "GET", "/v1/shelves/a/books/1")
    assert status == 503 and "no descriptor set" in body["message"]
    version = k.version()
    (k.folder / ".shop.pb.tmp").write_bytes(data)
    (k.folder / ".shop.pb.tmp").rename(k.folder / "shop.pb")
    await asyncio.to_thread(k.wait_for_new_version, version)
    status, body = await call(k, "GET", "/v1/shelves/a/books/1")
    assert (status, body) == (200, {"id": "1", "title": "a-", "shelfName": "a"})
