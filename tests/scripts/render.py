#!/usr/bin/env python3
"""Renders an envoy/*.yaml template: replaces ${NAME} with values from KEY=VALUE files and
arguments (later ones win). Fails, naming the variable, when one is left without a value.

usage: render.py TEMPLATE [VARS.env ...] [NAME=VALUE ...] > rendered.yaml
"""
import re
import sys


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    template = open(argv[1], encoding="utf-8").read()
    values = {}
    for arg in argv[2:]:
        if "=" in arg and not arg.endswith(".env"):
            name, value = arg.split("=", 1)
            values[name] = value
            continue
        for line in open(arg, encoding="utf-8"):
            line = line.strip()
            if line and not line.startswith("#"):
                name, value = line.split("=", 1)
                values[name] = value
    missing = sorted({m for m in re.findall(r"\$\{([A-Z0-9_]+)\}", template) if m not in values})
    if missing:
        sys.exit(f"{argv[1]}: no value for {', '.join(missing)}; pass NAME=VALUE or a .env file")
    sys.stdout.write(re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: values[m.group(1)], template))


if __name__ == "__main__":
    main(sys.argv)
