"""Run a Python module or script in this process and record its peak RSS (VmHWM).

    python -m benchmarks.peak_rss OUT.txt -m onnxprune prune in.onnx -o out.onnx
    python -m benchmarks.peak_rss OUT.txt some_script.py --flag

The parent's ``ru_maxrss`` of a child counts the forked parent image before
``exec``; reading VmHWM here, after exec, measures only this program.
"""

from __future__ import annotations

import runpy
import sys


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    out, rest = sys.argv[1], sys.argv[2:]
    code = 0
    try:
        if rest[0] == "-m":
            sys.argv = [rest[1], *rest[2:]]
            runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = rest
            runpy.run_path(rest[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        with open(out, "w") as f:
            f.write(f"{_peak_kib() * 1024}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
