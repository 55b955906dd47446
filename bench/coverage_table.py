"""Coverage over the whole model zoo: nodes, unique ops, relevance-carrying nodes, coverage, fallbacks,
conservation, trace and codegen time, as a Markdown table with totals (the README's coverage table comes
from here).

    python bench/coverage_table.py [--rules PRESET] [NAME ...]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from dataclasses import dataclass

import torch

import lrpc
from lrpc import zoo


@dataclass
class Row:
    name: str
    paper: bool
    nodes: int = 0
    steps: int = 0
    covered: int = 0
    ops: frozenset[str] = frozenset()
    line: str = ""


def row(name: str, rules: str) -> Row:
    entry = zoo.get(name)
    paper = "yes" if entry.paper else ""
    start = time.perf_counter()
    try:
        model, args, kwargs = entry.build()
        attributor = lrpc.compile(model, rules=rules, backend="eager", on_unsupported="warn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attributor(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a table row says what failed
        reason = str(e).strip().splitlines()[0][:80]
        line = f"| {name} | {entry.family} | {paper} | - | - | - | not traced: {type(e).__name__}: {reason} | | | {time.perf_counter() - start:.1f} |"
        return Row(name, entry.paper, line=line)
    r = attributor.report()
    cons = f"{r.conservation:.3f}" if r.conservation is not None else "-"
    fallbacks = ", ".join(sorted({f.split(" at ")[0] for f in r.fallbacks})) or "-"
    line = (
        f"| {name} | {entry.family} | {paper} | {r.nodes} | {len(r.op_counts)} | {r.steps} "
        f"| {r.coverage:.2%} | {fallbacks} | {cons} | {time.perf_counter() - start:.1f} |"
    )
    return Row(name, entry.paper, r.nodes, r.steps, round(r.coverage * r.steps), frozenset(r.op_counts), line)


def total(label: str, rows: list[Row]) -> str:
    steps, covered = sum(r.steps for r in rows), sum(r.covered for r in rows)
    traced = sum(1 for r in rows if r.nodes)
    share = f"{covered / steps:.2%}" if steps else "-"
    ops = len(frozenset().union(*(r.ops for r in rows)))
    return f"| **{label}** ({traced}/{len(rows)} traced) | | | {sum(r.nodes for r in rows)} | {ops} | {steps} | {share} | | | |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="zoo entries (default: all)")
    parser.add_argument("--rules", default="epsilon")
    args = parser.parse_args()
    print(
        f"rules: {args.rules}; lrpc {lrpc.__version__}, torch {torch.__version__}, "
        f"{platform.python_implementation()} {platform.python_version()}, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| model | family | paper | nodes | unique ops | carry relevance | coverage | fallbacks | conservation | seconds |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    rows = []
    for name in args.names or zoo.names():
        rows.append(row(name, args.rules))
        print(rows[-1].line, flush=True)
    print(total("paper's architectures", [r for r in rows if r.paper]))
    print(total("all", rows))


if __name__ == "__main__":
    main()
