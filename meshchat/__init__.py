"""meshchat: chat with one language model split by layers across the machines of a LAN."""

import os as _os

__version__ = "0.1.0"

# llama.cpp's CPU threads are OpenMP threads; by default libgomp lets them spin ~300k iterations
# (milliseconds) after each graph. Stages that share a machine take turns on a sequence, so an
# idle stage's spinning threads steal the cores of the stage that runs: measured 19 → 10 ms per
# token for a two-process split on 2 cores, with solo speed unchanged within noise. libgomp reads
# this once, when llama.cpp loads, so it is set here, before anything imports llama_cpp.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")
