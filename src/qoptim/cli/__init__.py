"""The `qoptim` command: demo (default), memory, bench.

Modules:
    __init__.py  main(): the argument parsing and the user's errors, each command's entry
    demo.py      `qoptim demo`: a small GPT trained with several optimizers, compared in a table and a plot
    memory.py    `qoptim memory`: a model's optimizer-state memory and the GPUs its training state fits on
    lean.py      the lean-training set-ups, and counting a run's training bytes from live tensors
    machine.py   the threads a run uses and the CPU's name
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from . import demo, machine, memory

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"qoptim {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (with where to look), not argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qoptim", description="Memory-efficient 8-bit optimizers for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    command = sub.add_parser("demo", help="train a small GPT with several optimizers and compare them (default)")
    command.add_argument("--steps", type=_positive_int, default=300, help="training steps per optimizer (default 300)")
    command.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    command.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter dtype (default float32)")
    command.add_argument("--out", type=Path, default=Path("out"), help="folder for the loss plot (default ./out)")
    command.add_argument("--optimizers", default="torch_adamw,adamw8bit,pagedadamw8bit,lean,lean4",
                         help="comma-separated optimizers or set-ups of qoptim.cli.lean (lean: bf16, 24-bit master, "
                              "release; lean4: the same with AdamW4bit)")  # fmt: skip
    command.add_argument("--no-isolate", action="store_true", help="train in this process (peak memory is then shared)")
    command.set_defaults(run=_demo)

    command = sub.add_parser("memory", help="optimizer-state memory of a model and the GPUs it fits on")
    command.add_argument("model_spec", metavar="MODEL_SPEC", help="a parameter count (7B, 350M) or a config.json path")
    command.add_argument("--bytes-per-weight", type=int, choices=(2, 4), default=2, help="2 for bf16/fp16 training, 4 for fp32")
    command.add_argument("--min-8bit-size", type=_positive_int, default=4096)
    command.set_defaults(run=_memory)

    command = sub.add_parser("bench", help="run the benchmark tables of benchmarks/ on this machine")
    command.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    command.set_defaults(run=_bench)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _demo(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"the demo runs on cpu or cuda, not {device!r}")
    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    known = demo.optimizer_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown optimizer {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    machine.default_threads()
    demo.run_demo(names, args.steps, device, DTYPES[args.dtype], args.out, isolate=not args.no_isolate)
    return 0


def _memory(args) -> int:
    print(memory.report(args.model_spec, args.bytes_per_weight, args.min_8bit_size))
    return 0


def _bench(args) -> int:
    folder = Path(__file__).resolve().parents[3] / "benchmarks"  # src/qoptim/cli/__init__.py -> the checkout
    scripts = sorted(folder.glob("step_*.py"))
    if not scripts:
        raise RuntimeError(f"no benchmark scripts found in {folder} (they live in qoptim's source checkout)")
    for script in scripts:
        print(f"== {script.name}", flush=True)
        result = subprocess.run([sys.executable, str(script), *(["--quick"] if args.quick else [])])
        if result.returncode:
            return result.returncode
    return 0

