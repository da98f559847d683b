#!/usr/bin/env python3
"""Lists the longest functions of the product crates (common, vmwatch-node, vmwatch-master).

Counts lines from a `fn` line to its closing brace; `#[cfg(test)]` modules and test-only files
are left out. A heuristic (strings and `//` comments are stripped; braces in raw strings and char
literals still count), good enough for a before/after.
Usage: scripts/longest-fns.py [N]
"""
import os
import re
import sys

FN = re.compile(r'^\s*(pub(\([a-z]+\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)')
ROOTS = ["common/src", "vmwatch-node/src", "vmwatch-master/src"]
SKIP = {"fuzz.rs"}


def functions(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    out = []
    i = 0
    while i < len(lines):
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if lines[i].strip() == "#[cfg(test)]" and nxt.startswith("mod ") and nxt.endswith("{"):
            break  # unit tests sit at the bottom of the file
        m = FN.match(lines[i])
        if m and not lines[i].rstrip().endswith(";"):
            depth, started, j = 0, False, i
            while j < len(lines):
                # Strings first: a `//` inside one (a URL) is not a comment.
                code = re.sub(r'"(\\.|[^"\\])*"', '""', lines[j]).split("//")[0]
                depth += code.count("{") - code.count("}")
                started = started or "{" in code
                if started and depth <= 0:
                    break
                j += 1
            out.append((j - i + 1, f"{path}:{i + 1}", m.group(7)))
            i = j + 1 if depth <= 0 and started and j > i else i + 1
            continue
        i += 1
    return out


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    found = []
    for root in ROOTS:
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".rs") and f not in SKIP:
                    found += functions(os.path.join(dirpath, f))
    for length, where, name in sorted(found, reverse=True)[:n]:
        print(f"{length:5} {name:32} {where}")


main()
