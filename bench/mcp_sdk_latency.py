"""What Tollgate's MCP proxy adds to an allowed tool call, as an agent using the official MCP Python
SDK sees it: the same calls directly to an MCP server and through `tollgate-gateway standalone`
(SQLite trail on the same disk), beside the floor the target is written against: two durable
records (a decision before forwarding, a report after), each at least one fdatasync of this disk,
measured in the same run.

    cargo build --release -p tollgate-gateway
    target/sdk-venv/bin/python bench/mcp_sdk_latency.py [CALLS]   # default 1000

Needs target/sdk-venv (`bash e2e/sdk/install.sh`). Prints one Markdown table.
"""

import asyncio
import hashlib
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
GATEWAY = pathlib.Path(os.environ.get("TOLLGATE_GATEWAY", ROOT / "target/release/tollgate-gateway"))
SERVER = ROOT / "gateway/tests/sdk/mcp_server.py"
KEY = "bench-key-1"
CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
WARMUP = 100

POLICY = """
apiVersion: tollgate.dev/v1alpha1
kind: AgentIdentity
metadata: {name: bench}
spec:
  description: The latency bench's agent
  podSelector: {matchLabels: {app: bench}}
  owner: {team: platform, contacts: [alice@example.com]}
---
apiVersion: tollgate.dev/v1alpha1
kind: AgentPolicy
metadata: {name: bench}
spec:
  identityRef: {name: bench}
  upstreams:
    - name: tools
      mcp: {url: "URL"}
  tools:
    allowed:
      - name: echo
        upstream: tools
        arguments:
          fields:
            message: {type: string, required: true, maxLength: 100}
  execution:
    maxSteps: 1000000
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port, what):
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def fdatasync_floor(directory, n=500):
    """p50 of overwriting 4 KiB in place and fdatasync-ing it, on the trail's filesystem."""
    path = pathlib.Path(directory) / "floor"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"\0" * 4096)
    os.fsync(fd)
    times = []
    for i in range(n):
        start = time.perf_counter()
        os.pwrite(fd, bytes([i % 256]) * 4096, 0)
        os.fdatasync(fd)
        times.append(time.perf_counter() - start)
    os.close(fd)
    return statistics.median(times)


async def interleaved(direct_url, through_url, headers):
    """Both sessions open at once, their calls alternating, so that the machine's drift over
    the run falls on both alike."""
    from contextlib import AsyncExitStack

    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    times = {"direct": [], "through": []}
    async with AsyncExitStack() as stack:
        clients = {}
        for name, url, extra in [("direct", direct_url, {}), ("through", through_url, headers)]:
            transport = streamable_http_client(url, http_client=create_mcp_http_client(headers=extra))
            clients[name] = await stack.enter_async_context(Client(transport, mode="legacy"))
        for i in range(WARMUP + CALLS):
            order = ["direct", "through"] if i % 2 == 0 else ["through", "direct"]
            for name in order:
                start = time.perf_counter()
                result = await clients[name].call_tool("echo", {"message": f"call {i}"})
                elapsed = time.perf_counter() - start
                assert not result.is_error, result
                if i >= WARMUP:
                    times[name].append(elapsed)
    return times["direct"], times["through"]


def main():
    if not GATEWAY.exists():
        sys.exit(f"{GATEWAY} is missing: cargo build --release -p tollgate-gateway")
    work = pathlib.Path(tempfile.mkdtemp(prefix="tollgate-mcp-bench-"))
    server_port, gateway_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, SERVER, "http", str(server_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    policies = work / "policies"
    policies.mkdir()
    (policies / "bench.yaml").write_text(
        POLICY.replace("URL", f"http://127.0.0.1:{server_port}/mcp")
    )
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    (work / "keys.yaml").write_text(
        f"keys:\n  - {{name: bench, agent: default/bench, sha256: {digest}}}\n"
    )
    (work / "secrets").mkdir()
    gateway = subprocess.Popen(
        [GATEWAY, "standalone", "--policies", policies, "--keys", work / "keys.yaml",
         "--audit", work / "audit.db", "--listen", f"127.0.0.1:{gateway_port}",
         "--secrets", work / "secrets"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(server_port, "the MCP server")
        wait_for(gateway_port, "the gateway")
        direct, through = asyncio.run(
            interleaved(
                f"http://127.0.0.1:{server_port}/mcp",
                f"http://127.0.0.1:{gateway_port}/mcp/tools",
                {"Authorization": f"Bearer {KEY}"},
            )
        )
        floor = fdatasync_floor(work)
    finally:
        gateway.terminate()
        server.terminate()
        gateway.wait()
        server.wait()
    ms = lambda s: f"{s * 1000:.3f} ms"
    d50, t50 = statistics.median(direct), statistics.median(through)
    d99, t99 = percentile(direct, 0.99), percentile(through, 0.99)
    added = t50 - d50
    target = 2 * floor + 0.0002
    print(f"{CALLS} sequential `tools/call` (echo) per row, the two sessions alternating, after {WARMUP} to warm up; MCP Python SDK, legacy mode")
    print()
    print("| path | p50 | p99 |")
    print("|---|---|---|")
    print(f"| directly to the server | {ms(d50)} | {ms(d99)} |")
    print(f"| through Tollgate | {ms(t50)} | {ms(t99)} |")
    print(f"| added by Tollgate | {ms(added)} | {ms(t99 - d99)} |")
    print(f"| floor: fdatasync of 4 KiB on the trail's disk | {ms(floor)} | |")
    print(f"| target: two durable records + 0.2 ms | {ms(target)} | |")
    print()
    print(f"added / target: {added / target:.2f}")
    # A row of bench/README.md's summary, when bench/run asks for it.
    if os.environ.get("TOLLGATE_BENCH_REPORT"):
        row = {"benchmark": "mcp-sdk-latency", "what": "MCP `tools/call` added at p50, Python SDK client",
               "tollgate": added * 1e3, "beside": "two fdatasyncs of 4 KiB + 0.2 ms (the target)",
               "peer": target * 1e3, "unit": "ms", "better": "lower"}
        with open(os.environ["TOLLGATE_BENCH_REPORT"], "a") as f:
            f.write(json.dumps(row) + "\n")


main()
