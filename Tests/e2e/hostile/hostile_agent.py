"""An agent that breaks the HTTP contract on purpose, for cubicled's hostile-input tests. Standard library only.

POST /invocations with JSON {"mode": M}:
  ok               a normal JSON answer (the session still works after the others)
  malformed        a status line and headers that are not HTTP, then close
  endless-headers  a status line, then headers forever
  huge-chunk       a chunked response whose first chunk declares 1 GiB, then 64 MiB of it, then close
  bad-chunk        a chunk size that is not hex
  close-mid        Content-Length 1,000,000, ten bytes, close
  never            read the request and never answer
GET /ping answers Healthy, unless HOSTILE_PING=never: then it accepts and never answers.
"""
import json
import os
import socket
import threading
import time


def read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None, None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return method, path, rest[:length]


def respond_json(conn, obj):
    body = json.dumps(obj).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def serve(conn):
    try:
        while True:
            method, path, body = read_request(conn)
            if method is None:
                return
            if path == "/ping":
                if os.environ.get("HOSTILE_PING") == "never":
                    time.sleep(3600)
                respond_json(conn, {"status": "Healthy", "time_of_last_update": int(time.time())})
                continue
            mode = json.loads(body or b"{}").get("mode", "ok")
            if mode == "ok":
                respond_json(conn, {"answer": "fine", "pid": os.getpid()})
                continue
            if mode == "malformed":
                conn.sendall(b"HTTP/1.1 2OO KO\r\nthis is not a header\r\n\x00\x01\x02\r\n\r\n")
            elif mode == "endless-headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                line = b"X-Endless: " + b"a" * 1000 + b"\r\n"
                while True:
                    conn.sendall(line)
            elif mode == "huge-chunk":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                conn.sendall(b"40000000\r\n")
                block = b"z" * (1 << 20)
                for _ in range(64):
                    conn.sendall(block)
            elif mode == "bad-chunk":
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\nhello\r\n0\r\n\r\n")
            elif mode == "close-mid":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n0123456789")
            elif mode == "never":
                time.sleep(3600)
            return
    except OSError:
        pass
    finally:
        conn.close()


def main():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(os.environ.get("PORT", "8080"))))
    s.listen(128)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


main()
