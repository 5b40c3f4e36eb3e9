"""`meshchat doctor [--model PATH] [--remeasure] [--json]`: this machine, as the engine sees it.

It prints the CPU and the features that decide llama.cpp's speed and safety, llama.cpp's own
system info, the engine profile chosen for the model, and every probe behind the choice, with
its speeds or why it was rejected. `--remeasure` probes again (after a driver or BIOS change,
say: a new llama.cpp build or CPU re-probes by itself).
"""

from __future__ import annotations

import argparse
import json

from meshchat.commands.common import choose_model, thread_count
from meshchat.inference import profiling
from meshchat.inference.capabilities import free_memory
from meshchat.inference.local_model import LocalModel
from meshchat.inference.profiling import Calibration, TrialOutcome
from meshchat.paths import DataDir

# CPU flags that change what llama.cpp runs (x86-64 /proc/cpuinfo names, then ARM64 ones).
NOTABLE_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "sve2", "i8mm",
)  # fmt: skip


def run_doctor(args: argparse.Namespace) -> int:
    data = DataDir.resolve(args.data_dir)
    choice = choose_model(args, data)
    model = LocalModel.from_header(choice.header, data)
    threads = thread_count(args.threads)
    calibration = profiling.calibration(
        model, data, threads, free_memory(), remeasure=args.remeasure
    )
    cpu = profiling.cpu_info()
    flags = [flag for flag in NOTABLE_FLAGS if flag in cpu.flags]
    if args.json:
        report = {"cpu": cpu.name, "cpu_flags": flags, "model": str(choice.path)}
        print(json.dumps({**report, **calibration.to_json()}, indent=2))
        return 0
    print(_text(cpu.name, flags, str(choice.path), calibration))
    return 0


def _text(cpu: str, flags: list[str], model: str, calibration: Calibration) -> str:
    first, end = calibration.measured_layers
    lines = [
        f"cpu          {cpu} ({', '.join(flags) or 'no notable flags'})",
        f"llama.cpp    {calibration.system_info}",
        f"model        {model} (probed layers [{first},{end}))",
        f"profile      {calibration.profile.label}",
        "probes:",
    ]
    for trial in calibration.trials:
        if trial.outcome is TrialOutcome.OK and trial.speed is not None:
            figures = (
                f"decode {trial.speed.decode_s_per_byte * 1e9:.3f} s/GB, "
                f"prefill {trial.speed.prefill_s_per_byte * 1e9:.3f} s/GB"
            )
        else:
            figures = trial.detail
        lines.append(f"  {trial.profile.label:<42} {trial.outcome.value:<9} {figures}")
    return "\n".join(lines)
