#!/usr/bin/env python3
"""A tiny HTTP backend that answers every request with its name.

    backend.py NAME PORT [HOST]

HOST may be an IPv6 literal (e.g. ::1): then the server is an AF_INET6 one.
Used by the demo and the tests. It prints 'listening' once bound, so a caller
can wait for that line instead of sleeping. HTTP/1.1 keep-alive is honoured.
"""
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
    body = f"{name}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        allow_reuse_address = True
        request_queue_size = 1024
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass  # clients that reset are normal here


    class Server6(Server):
        address_family = socket.AF_INET6

    srv = (Server6 if ":" in host else Server)((host, port), Handler)
    print("listening", srv.server_address[1], flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C in the demo's terminal reaches us too
        pass


if __name__ == "__main__":
    main()
