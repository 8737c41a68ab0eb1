"""A STAND-IN for bbcp (the real one is not installed here: it is not packaged for Debian or
PyPI), run as `bench/standin/bbcp`. It is not bbcp and is never used outside bench/ and tests.

It takes the options BbcpTransport passes (tests/test_bbcp.py pins them), waits the fixed
start-up real bbcp takes per call (1.5 s; BBCP_STANDIN_STARTUP_S overrides), starts its
receiver on the target with the `-T` command, as bbcp starts itself there, and sends every file
over one plain TCP connection from here to that receiver, as bbcp moves data outside ssh. It
prints what real bbcp prints on stderr (fixtures/bbcp: `bbcp: Creating`, `File X created; N
bytes at R MB/s` with -v, `N files copied at effectively R MB/s`), so our parser accepts it.

Not modelled: resuming (-a appends nothing; files are written whole), -s parallel streams,
-x/-t limits, in-flight checksums (-E is accepted and ignored), a remote source.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time

STARTUP_S = float(os.environ.get("BBCP_STANDIN_STARTUP_S", "1.5"))
WITH_VALUE = {"-s", "-w", "-P", "-x", "-t", "-Z", "-E", "-S", "-T"}
FLAGS = {"-k", "-f", "-v", "--"}

# Runs on the target (python3 -c): listens on a free port, says which, takes one connection,
# then per file a JSON header line {"path", "size"} and that many bytes; reports each file.
RECEIVER = r"""
import json, os, socket, sys, time
listener = socket.create_server(("", 0))
print(listener.getsockname()[1], flush=True)
connection, _ = listener.accept()
stream = connection.makefile("rb", buffering=1 << 20)
buffer = bytearray(1 << 20)
view = memoryview(buffer)
while line := stream.readline().strip():
    header = json.loads(line)
    path, left = header["path"], header["size"]
    started = time.monotonic()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        print(f"bbcp: {exc.strerror} opening {path}", file=sys.stderr, flush=True)
        sys.exit(exc.errno or 1)
    while left:
        count = stream.readinto(view[:min(left, len(buffer))])
        if not count:
            print(f"bbcp: connection lost writing {path}", file=sys.stderr, flush=True)
            sys.exit(255)
        os.write(fd, view[:count])
        left -= count
    os.close(fd)
    print(json.dumps({"path": path, "size": header["size"],
                      "seconds": time.monotonic() - started}), flush=True)
"""


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        word = argv[i]
        if word in WITH_VALUE:
            options[word] = argv[i + 1]
            i += 2
        elif word == "-a":  # optional argument, as in bbcp: the next word unless an option
            has_dir = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            options["-a"] = argv[i + 1] if has_dir else ""
            i += 2 if has_dir else 1
        elif word in FLAGS:
            options[word] = ""
            i += 1
        else:
            raise SystemExit(f"bbcp (stand-in): unsupported option {word}")
    return options, argv[i:]


def rate(size: int, seconds: float) -> str:
    return f"{size / max(seconds, 1e-6) / (1 << 20):.1f} MB/s"


def main(argv: list[str]) -> int:
    started = time.monotonic()
    options, words = parse(argv)
    if len(words) < 2:
        print("bbcp: no target specified", file=sys.stderr)
        return 22
    *sources, target = words
    host, _, directory = target.rpartition(":") if ":" in target.split("/", 1)[0] \
        else ("", "", target)
    if not host or "-T" not in options:
        print("bbcp (stand-in): only pushes to a remote target (host:/path)", file=sys.stderr)
        return 22
    user, _, hostname = host.rpartition("@")
    time.sleep(STARTUP_S)
    sizes = []
    for source in sources:
        try:
            sizes.append(os.stat(source).st_size)
        except OSError:
            print(f"bbcp: No such file or directory processing {source}", file=sys.stderr)
            return 2
    names = [directory.rstrip("/") + "/" + os.path.basename(s) if target.endswith("/")
             else directory for s in sources]
    # -T is split on single spaces and %H/%U substituted, as bbcp does; its last word (the
    # remote bbcp program) is replaced by our receiver.
    start = [{"%H": hostname, "%U": user}.get(w, w) for w in options["-T"].split(" ")][:-1]
    receiver = subprocess.Popen([*start, "python3 -c " + shlex.quote(RECEIVER)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert receiver.stdout is not None
    port = receiver.stdout.readline().strip()
    if not port.isdigit():
        receiver.wait()
        print(f"bbcp: unexpectedly terminated on {hostname}", file=sys.stderr)
        return 255
    progress = "-P" in options
    with socket.create_connection((hostname, int(port))) as connection:
        for source, name, size in zip(sources, names, sizes, strict=True):
            if progress:
                print(f"bbcp: Creating {name}", file=sys.stderr, flush=True)
            connection.sendall(json.dumps({"path": name, "size": size}).encode() + b"\n")
            with open(source, "rb") as stream:
                connection.sendfile(stream)
        connection.sendall(b"\n")
        connection.shutdown(socket.SHUT_WR)
        reports = [json.loads(line) for line in receiver.stdout]
    rc = receiver.wait()
    if rc != 0 or len(reports) != len(sources):
        print(f"bbcp: unexpectedly terminated on {hostname}", file=sys.stderr)
        return rc or 255
    if "-v" in options:
        for report in reports:
            print(f"File {report['path']} created; {report['size']} bytes at "
                  f"{rate(report['size'], report['seconds'])}", file=sys.stderr)
    files = "1 file" if len(sources) == 1 else f"{len(sources)} files"
    print(f"{files} copied at effectively {rate(sum(sizes), time.monotonic() - started)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
