"""Sums a py-spy raw profile (collapsed stacks) per function: self and inclusive shares.

    python -m bench.profile_top bench/out/profile.txt [N]
"""

from __future__ import annotations

import sys
from collections import Counter


def main(argv: list[str]) -> int:
    path = argv[1]
    top = int(argv[2]) if len(argv) > 2 else 30
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(n)
            frames = stack.split(";")
            total += count
            own[frames[-1]] += count
            for frame in set(frames):
                incl[frame] += count
    print(f"{total} samples")
    print("self %   function")
    for name, samples in own.most_common(top):
        print(f"{100 * samples / total:6.1f}   {name}")
    print("incl %   function")
    for name, samples in incl.most_common(top):
        print(f"{100 * samples / total:6.1f}   {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
