# The benchmark helpers live in the package (qengine.benchmark.harness) so `qengine bench` can
# use them; the scripts here import them under this name, with the command-line options several
# scripts share.
import argparse
import os

from qengine.benchmark.harness import *  # noqa: F401,F403
from qengine.benchmark.harness import __all__  # noqa: F401


# Source of kib(field): a /proc/self/status field (VmRSS, VmHWM) in KiB, for the child scripts
# the memory benchmarks run in fresh interpreters.
PROC_STATUS_KIB = '''
def kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
'''


def bench_parser(doc: str, name: str, quick_help: str) -> argparse.ArgumentParser:
    """A timing script's parser (described by doc's first line) with its common options: --quick
    (quick_help), --json (default bench/out/NAME.json) and --threads."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", f"{name}.json"))
    p.add_argument("--threads", type=int, default=None)
    return p


def add_llama_size_args(ap: argparse.ArgumentParser, vocab: int) -> None:
    """--layers, --hidden, --intermediate and --vocab: the size of a Llama model built from a config."""
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=vocab)
