"""Start-up time of the CLI next to `import torch`, measured side by side in one run.

    python bench/bench_startup.py [--repeat 5]

Prints the median wall time of each command over fresh processes, and the ratio
to `python -c "import torch"`.  Goal: `fuse --help` and `fuse list` under 0.3 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def timed(cmd: list[str], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    fuse = shutil.which("fuse") or sys.exit("`fuse` is not on PATH; pip install -e . first")
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "fuse --help": [fuse, "--help"],
        "fuse list": [fuse, "list"],
        "fuse plugins --all": [fuse, "plugins", "--all"],
        "fuse show ties": [fuse, "show", "ties"] if subprocess.run([fuse, "show", "ties"], capture_output=True).returncode == 0 else [fuse, "show", "dummy"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    timed(commands["fuse --help"], 1)  # warm the page cache
    results = {name: timed(cmd, args.repeat) for name, cmd in commands.items()}
    torch_s = results['python -c "import torch"']
    print(f"{'command':<28}{'median s':>10}{'× import torch':>16}")
    for name, seconds in results.items():
        print(f"{name:<28}{seconds:>10.3f}{seconds / torch_s:>16.2f}")


if __name__ == "__main__":
    main()
