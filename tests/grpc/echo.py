"""gRPC echo server and client for the mesh end-to-end tests (all four call kinds, trailers,
status codes, large messages), without generated code: messages are raw bytes.

  echo.py serve <host:port> <name>   serve until killed; prints "ready" once listening
  echo.py call <host:port>           run every check through <host:port>; prints a JSON report
                                     and exits non-zero on the first wrong answer
  echo.py flaky <host:port> <n>      <n> calls, one at a time, to Flaky (which fails every second
                                     call with UNAVAILABLE); prints {"ok": .., "unavailable": ..}
"""
import itertools
import json
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "echo.Echo"


def ident(b):
    return b


def serve(addr, name):
    def unary(req, ctx):
        ctx.set_trailing_metadata((("x-served-by", name),))
        return req

    def server_stream(req, ctx):
        n = int(req.decode())
        for i in range(n):
            yield f"{name}:{i}".encode()
        ctx.set_trailing_metadata((("x-count", str(n)),))

    def client_stream(reqs, ctx):
        parts = [r for r in reqs]
        return b"|".join(parts)

    def bidi(reqs, ctx):
        for r in reqs:
            yield r[::-1]

    def fail(req, ctx):
        ctx.set_trailing_metadata((("x-why", "asked-to-fail"),))
        ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "failing as asked: " + req.decode())

    flaky_calls = itertools.count(1)
    flaky_lock = threading.Lock()

    def flaky(req, ctx):
        with flaky_lock:
            n = next(flaky_calls)
        if n % 2 == 0:
            # Before any message: a trailers-only response, grpc-status in the headers.
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"call {n} fails")
        return req

    handlers = {
        "Flaky": grpc.unary_unary_rpc_method_handler(flaky, ident, ident),
        "Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, ident, ident),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, ident, ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, ident, ident),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
    }
    opts = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=opts)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(addr)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def check(what, got, want, report):
    report[what] = got if isinstance(got, (str, int, list, dict)) else repr(got)
    if got != want:
        print(json.dumps(report), flush=True)
        sys.exit(f"{what}: got {got!r}, want {want!r}")


def call(addr):
    opts = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    ch = grpc.insecure_channel(addr, options=opts)
    grpc.channel_ready_future(ch).result(timeout=10)
    m = lambda kind, name: getattr(ch, kind)(f"/{SERVICE}/{name}", request_serializer=ident,
                                               response_deserializer=ident)
    report = {}

    resp, c = m("unary_unary", "Unary").with_call(b"hello", timeout=10)
    check("unary", resp.decode(), "hello", report)
    trailers = dict(c.trailing_metadata())
    check("unary trailer", "x-served-by" in trailers, True, report)
    report["served_by"] = trailers.get("x-served-by")

    big = bytes(range(256)) * 4096  # 1 MiB
    check("unary 1 MiB", m("unary_unary", "Unary")(big, timeout=10) == big, True, report)

    it = m("unary_stream", "ServerStream")(b"50", timeout=10)
    got = [x.decode().split(":")[1] for x in it]
    check("server stream", got, [str(i) for i in range(50)], report)
    check("server stream trailer", dict(it.trailing_metadata()).get("x-count"), "50", report)

    resp = m("stream_unary", "ClientStream")(iter([b"a", b"b", b"c"]), timeout=10)
    check("client stream", resp.decode(), "a|b|c", report)

    got = [x.decode() for x in m("stream_stream", "Bidi")(iter([b"abc", b"xyz", b"123"]), timeout=10)]
    check("bidi", got, ["cba", "zyx", "321"], report)

    try:
        m("unary_unary", "Fail")(b"now", timeout=10)
        check("fail status", "OK", "FAILED_PRECONDITION", report)
    except grpc.RpcError as e:
        check("fail status", e.code().name, "FAILED_PRECONDITION", report)
        check("fail message", e.details(), "failing as asked: now", report)
        check("fail trailer", dict(e.trailing_metadata()).get("x-why"), "asked-to-fail", report)

    print(json.dumps(report), flush=True)


def flaky_calls(addr, n):
    ch = grpc.insecure_channel(addr)
    grpc.channel_ready_future(ch).result(timeout=10)
    f = ch.unary_unary(f"/{SERVICE}/Flaky", request_serializer=ident, response_deserializer=ident)
    tally = {"ok": 0, "unavailable": 0, "other": 0}
    for i in range(n):
        try:
            f(b"x", timeout=10)
            tally["ok"] += 1
        except grpc.RpcError as e:
            tally["unavailable" if e.code() == grpc.StatusCode.UNAVAILABLE else "other"] += 1
    print(json.dumps(tally), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "call":
        call(sys.argv[2])
    elif sys.argv[1] == "flaky":
        flaky_calls(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
