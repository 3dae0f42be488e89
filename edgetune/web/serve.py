"""A static file server for a web export, on localhost: it sends the two headers that make the
page cross-origin isolated (so onnxruntime-web may use threads) and the types browsers insist
on for ES modules and WebAssembly."""
from __future__ import annotations

import functools
import http.server
import os
import threading


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".onnx": "application/octet-stream", ".data": "application/octet-stream",
                      ".safetensors": "application/octet-stream"}

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")  # a new export is never mixed with an old one
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per file would bury the address the user needs


def make_server(folder: str | os.PathLike, port: int = 0, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """A server for `folder` on host:port (port 0: any free one); `server.server_address` says
    which. Call serve_forever(), or start_in_thread()."""
    handler = functools.partial(_Handler, directory=os.fspath(folder))
    return http.server.ThreadingHTTPServer((host, port), handler)


def start_in_thread(server: http.server.ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def address(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def serve(folder: str | os.PathLike, port: int, message: str) -> None:
    """Serve `folder` on localhost until Ctrl-C, first printing `message` with {address} filled
    in. A taken port falls back to a free one, said."""
    try:
        server = make_server(folder, port)
    except OSError as err:
        server = make_server(folder, 0)
        print(f"port {port} is not free ({err.strerror}); using another", flush=True)
    print(message.format(address=address(server)), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgetune.web.serve", description=__doc__)
    parser.add_argument("folder", help="a folder of `edgetune export --web`")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    serve(args.folder, args.port, f"serving {args.folder} at {{address}} (Ctrl-C stops)")


if __name__ == "__main__":
    main()
