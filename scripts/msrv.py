#!/usr/bin/env python3
"""The declared MSRV is true: no dependency resolved for the crate (default features, each
feature alone, all features) declares a `rust-version` above the crate's own.

Reads `cargo metadata` (offline: the lockfile decides the versions). Exits 1 and names the
offenders otherwise. Run by .ci/run.
"""
import json
import subprocess
import sys


def version(v):
    parts = [int(p) for p in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def check(features):
    host = [l.split(": ")[1] for l in subprocess.check_output(["rustc", "-vV"], text=True).splitlines() if l.startswith("host: ")][0]
    args = ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host]
    if features == "all":
        args.append("--all-features")
    elif features:
        args += ["--no-default-features", "--features", features]
    meta = json.loads(subprocess.check_output(args))
    packages = {p["id"]: p for p in meta["packages"]}
    root = meta["resolve"]["root"]
    declared = packages[root].get("rust_version")
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    # Walk normal (and build) dependencies only: dev-dependencies do not reach users.
    seen, todo = set(), [root]
    while todo:
        node = nodes[todo.pop()]
        for dep in node["deps"]:
            kinds = {k["kind"] for k in dep["dep_kinds"]}
            if kinds & {None, "build"} and dep["pkg"] not in seen:
                seen.add(dep["pkg"])
                todo.append(dep["pkg"])
    bad = []
    highest = ("", (0, 0, 0))
    for pid in seen:
        p = packages[pid]
        rv = p.get("rust_version")
        if rv and version(rv) > highest[1]:
            highest = (f"{p['name']} {p['version']}", version(rv))
        if rv and version(rv) > version(declared):
            bad.append(f"{p['name']} {p['version']} needs Rust {rv}")
    label = features or "default"
    hv = ".".join(map(str, highest[1]))
    print(f"msrv [{label}]: declared {declared}; {len(seen)} crates; highest {hv} ({highest[0]})")
    return bad


def main():
    failures = []
    for features in ["", "metrics", "reqwest", "redis", "redis-cluster", "hyper-util", "all"]:
        failures += check(features)
    if failures:
        print("rust-version is below what these dependencies need:", file=sys.stderr)
        for f in sorted(set(failures)):
            print("  " + f, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
