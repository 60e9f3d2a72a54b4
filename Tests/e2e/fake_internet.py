"""A small internet of the test's own: a network namespace joined to the host by one veth pair, holding
test hosts (addresses on its loopback), a DNS server (Debian's dnsmasq) and HTTP servers. The host routes
only the test's own addresses to it, and cubicled's --egress-interface is pinned to the host's end, so no
packet a session sends, allowed or refused, can leave this machine.

Addresses: the link is a /30 in 198.18.0.0/15 (RFC 2544's benchmarking range: "public" to the policy,
never routed on the internet); test hosts are in a /24 of 198.19.0.0/16; a private test host (10/8) and a
link-local one (169.254/16) sit there too, routed the same way, to show they are refused although a
route exists."""
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid

SERVER = r'''
import http.server, socketserver, sys, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {self.server.server_address[0]}:{self.server.server_address[1]} to {self.client_address[0]}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    def server_bind(self):  # not HTTPServer's: its getfqdn would wait on a resolver this namespace cannot reach
        socketserver.TCPServer.server_bind(self)
servers = [S((a, int(p)), H) for a, p in (x.split(":") for x in sys.argv[1:])]
import threading
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("serving", flush=True)
servers[0].serve_forever()
'''


def _run(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def _routed(prefix):
    """Whether the host already routes anything inside `prefix` (another test's internet)."""
    out = _run("ip", "-4", "route", "show", "root", prefix, check=False).stdout
    return bool(out.strip())


class FakeInternet:
    def __init__(self, names=None):
        """names: {dns name: host key}; host keys are 'a', 'b', 'c', ... (public test hosts), 'private', 'linklocal'."""
        self.tag = uuid.uuid4().hex[:6]
        self.netns = f"cbt-{self.tag}"
        self.link = f"cbt{self.tag}"  # the host's end, cubicled's --egress-interface
        for _ in range(100):
            n = random.randrange(0, 16384)
            self.link_net = f"198.{18 + (n >> 13)}.{(n >> 5) & 255}.{(n & 31) * 8}"
            h = random.randrange(0, 256)
            self.hosts_net = f"198.19.{h}.0/24"
            self.private_host = f"10.{random.randrange(1, 255)}.{random.randrange(0, 256)}.5"
            self.linklocal_host = f"169.254.{random.randrange(1, 254)}.7"
            if not any(_routed(p) for p in (self.link_net + "/29", self.hosts_net, self.private_host + "/32", self.linklocal_host + "/32")):
                break
        base = self.link_net.rsplit(".", 1)
        self.host_address = f"{base[0]}.{int(base[1]) + 1}"   # the host's end of the link
        self.inside_address = f"{base[0]}.{int(base[1]) + 2}"
        prefix = self.hosts_net.rsplit(".", 1)[0]
        self.hosts = {k: f"{prefix}.{10 + i}" for i, k in enumerate("abcdef")}
        self.hosts["private"] = self.private_host
        self.hosts["linklocal"] = self.linklocal_host
        self.dns = f"{prefix}.53"
        self.names = names or {}
        self.processes = []
        self.routes = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self.link, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        _run("ip", "addr", "add", f"{self.host_address}/29", "dev", self.link)
        _run("ip", "link", "set", self.link, "up")
        ns = ["ip", "-n", self.netns]
        _run(*ns, "addr", "add", f"{self.inside_address}/29", "dev", "eth0")
        _run(*ns, "link", "set", "eth0", "up")
        _run(*ns, "link", "set", "lo", "up")
        _run(*ns, "route", "add", "default", "via", self.host_address)
        for a in list(self.hosts.values()) + [self.dns]:
            _run(*ns, "addr", "add", f"{a}/32", "dev", "lo")
        for dest in (self.hosts_net, self.private_host + "/32", self.linklocal_host + "/32"):
            _run("ip", "route", "add", dest, "via", self.inside_address, "dev", self.link)
            self.routes.append(dest)
        exe = ["ip", "netns", "exec", self.netns]
        records = [f"--host-record={name},{self.hosts[key]}" for name, key in self.names.items()]
        self.processes.append(subprocess.Popen(
            exe + [shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                   f"--listen-address={self.dns}", "--port=53", "--local-ttl=300", "--user=root", "--pid-file=",
                   "--address=/#/", *records],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        listen = [f"{a}:80" for a in self.hosts.values()] + [f"{a}:8080" for a in self.hosts.values()]
        server = subprocess.Popen(exe + [sys.executable, "-c", SERVER, *listen], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.processes.append(server)
        if server.stdout.readline().strip() != "serving":
            raise RuntimeError("test HTTP servers did not start: " + server.stderr.read())
        deadline = time.time() + 10
        while not self._dns_answers():
            if time.time() > deadline or self.processes[0].poll() is not None:
                raise RuntimeError("dnsmasq did not start: " + (self.processes[0].stderr.read().decode() if self.processes[0].poll() is not None else ""))
            time.sleep(0.05)

    def serve(self, *argv):
        """Starts `argv` inside the namespace (stopped at close); waits for its first line, which must be "serving"."""
        p = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.processes.append(p)
        if p.stdout.readline().strip() != "serving":
            raise RuntimeError(f"{argv[:2]} did not start: " + p.stderr.read())
        return p

    def _dns_answers(self):
        q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04test\x00\x00\x01\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(q, (self.dns, 53))
                return len(s.recv(512)) >= 12
            except OSError:
                return False

    def close(self):
        for p in self.processes:
            p.kill()
            p.wait()
        for dest in self.routes:
            _run("ip", "route", "del", dest, check=False)
        _run("ip", "link", "del", self.link, check=False)
        _run("ip", "netns", "del", self.netns, check=False)


def session_network():
    """A /24 in 10.192.0.0/10 for one daemon's sessions, not routed on this host already."""
    for _ in range(100):
        net = f"10.{random.randrange(192, 255)}.{random.randrange(0, 256)}.0/24"
        if not _routed(net):
            return net
    raise RuntimeError("no free session network")
