"""Coverage over the whole model zoo: nodes, unique ops, relevance-carrying nodes, coverage, fallbacks,
conservation, trace and codegen time, as a Markdown table (the README's coverage table comes from here).

    python bench/coverage_table.py [--rules PRESET] [NAME ...]
"""

from __future__ import annotations

import argparse
import time
import warnings

import lrpc
from lrpc import zoo


def row(name: str, rules: str) -> str:
    entry = zoo.get(name)
    start = time.perf_counter()
    try:
        model, args, kwargs = entry.build()
        attributor = lrpc.compile(model, rules=rules, backend="eager", on_unsupported="warn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attributor(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a table row says what failed
        reason = str(e).strip().splitlines()[0][:80]
        return f"| {name} | {entry.family} | {'yes' if entry.paper else ''} | - | - | - | not traced: {type(e).__name__}: {reason} | | | {time.perf_counter() - start:.1f} |"
    r = attributor.report()
    cons = f"{r.conservation:.3f}" if r.conservation is not None else "-"
    fallbacks = ", ".join(sorted({f.split(" at ")[0] for f in r.fallbacks})) or "-"
    return (
        f"| {name} | {entry.family} | {'yes' if entry.paper else ''} | {r.nodes} | {len(r.op_counts)} | {r.steps} "
        f"| {r.coverage:.2%} | {fallbacks} | {cons} | {time.perf_counter() - start:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="zoo entries (default: all)")
    parser.add_argument("--rules", default="epsilon")
    args = parser.parse_args()
    print(f"rules: {args.rules}; lrpc {lrpc.__version__}\n")
    print("| model | family | paper | nodes | unique ops | carry relevance | coverage | fallbacks | conservation | seconds |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for name in args.names or zoo.names():
        print(row(name, args.rules), flush=True)


if __name__ == "__main__":
    main()
