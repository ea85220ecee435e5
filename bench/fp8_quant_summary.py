#!/usr/bin/env python3
"""Print the table of a ``bench/fp8_quant.py`` JSON (the ``fp8-quant`` suite's last stage): the
device, whether every point was bitwise equal to the reference, compile seconds, then per
(tokens, K) point the median ms of ours under a CUDA graph (with its TB/s), ours eager with row
and with column scales, the eager reference, the reference under torch.compile and the HBM floor
(``-`` where a figure is absent). Exits non-zero when the file cannot be read or lacks a field,
or when a point was not bitwise equal."""
import argparse
import json
import sys


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_lines(record: dict) -> list[str]:
    """The table's lines; KeyError / TypeError when ``record`` is not a fp8_quant.py record."""
    lines = [f"{record['device']} all bitwise {record['all_bitwise']} compile s "
             f"{round(record['compile_seconds'], 1)}",
             f"compiled baseline: {record['compiled_baseline']}",
             "T K: ours_graph ms (TB/s) | ours_row eager | ours_col eager | reference | "
             "compiled | floor"]
    for x in record["results"]:
        comp = x.get("compiled")
        lines.append(f"{x['tokens']} {x['k']}: {x['ours_graph']['median_ms']:.4f} "
                     f"({x['ours_graph_tbps']:.2f}) | {x['ours_row']['median_ms']:.4f} | "
                     f"{x['ours_col']['median_ms']:.4f} | {x['reference']['median_ms']:.4f} | "
                     f"{_ms(comp and comp['median_ms'])} | {_ms(x['floor_ms'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", help="bench/fp8_quant.py's --out file")
    args = ap.parse_args(argv)
    try:
        with open(args.json) as f:
            record = json.load(f)
        lines = summary_lines(record)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{args.json}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0 if record["all_bitwise"] else 1


if __name__ == "__main__":
    sys.exit(main())
