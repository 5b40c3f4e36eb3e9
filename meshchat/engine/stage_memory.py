"""What a loaded stage holds in memory, as llama.cpp reports it.

llama.cpp's C API has no call for its buffer sizes (`llama_memory_breakdown` is C++ only), but
it logs each buffer it allocates while loading a model and creating a context:

    load_tensors:   CPU_Mapped model buffer size =    49.83 MiB
    llama_kv_cache:        CPU KV buffer size =     7.50 MiB
    sched_reserve:        CPU compute buffer size =    98.25 MiB
    llama_context:        CPU  output buffer size =     0.19 MiB

The stage captures those lines (meshchat.engine.llama_lib.captured_log) and sums them by kind.
The output buffer grows later, when a batch asks for more output rows than it holds: a stage
that passes hidden states on flags every row, so its peak is n_batch rows of logits.

With extra buffer types on, llama.cpp copies some weights into a CPU_REPACK buffer. When the file
is memory-mapped the map still spans those tensors (a test Q4_0 model: 32.45 MiB mapped plus
8.65 MiB repacked, of 32.66 MiB of weights), but their mapped pages are read once and are page
cache the kernel drops: the repacked copy takes their place, so the weights count as the map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MIB = 1 << 20
_LINE = re.compile(
    r"(\S+)\s+(model|KV|RS|compute|output) buffer size =\s*([0-9]+(?:\.[0-9]+)?) MiB"
)


@dataclass(frozen=True)
class StageMemory:
    """Bytes one stage uses: weights, KV cache (and recurrent state), compute and output."""

    weights: int = 0
    kv: int = 0
    compute: int = 0
    output: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.output

    def with_output_peak(self, peak: int) -> StageMemory:
        """This usage with the output buffer at its largest (it grows after load)."""
        return StageMemory(self.weights, self.kv, self.compute, max(self.output, peak))

    def to_json(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "kv": self.kv,
            "compute": self.compute,
            "output": self.output,
            "total": self.total,
        }


def from_log(lines: list[str]) -> StageMemory:
    """Sum the buffer sizes llama.cpp logged (a model load and a context creation)."""
    sizes = {"weights": 0, "kv": 0, "compute": 0, "output": 0}
    kinds = {"model": "weights", "KV": "kv", "RS": "kv", "compute": "compute", "output": "output"}
    mapped = any(name.endswith("_Mapped") for line in lines for name, _, _ in _LINE.findall(line))
    for line in lines:
        for name, kind, mib in _LINE.findall(line):
            if mapped and name.endswith("_REPACK"):
                continue  # it stands in for mapped pages (see above)
            sizes[kinds[kind]] += round(float(mib) * _MIB)
    return StageMemory(**sizes)
