"""The Dagster layer: assets, checks, partitions and jobs of the package lifecycle."""

import os

# Before anything imports gRPC (Dagster does): gRPC's C core, left to its default, installs
# fork handlers of its own that its Python layer does not take part in, and a child forked
# while another thread of the process was in gRPC (a channel to a code server, as the UI's)
# could die of a segmentation fault before it did anything: the drive's run processes
# (runpool.py) are forked so. Told plainly, gRPC does nothing at a fork; no child uses the
# parent's gRPC (a run opens its own channels, if any).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
