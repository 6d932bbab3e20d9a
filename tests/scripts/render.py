#!/usr/bin/env python3
"""Renders an envoy/*.yaml template: replaces ${NAME} with values from KEY=VALUE files and
arguments (later ones win). Fails, naming the variable, when one is left without a value.

A sidecar configuration (a .toml file, e.g. autohttps.toml) among the arguments sets
TRUSTED_PROXY_RANGES from its `edge.trusted_proxies` (AUTOHTTPS_EDGE_TRUSTED_PROXIES wins, as
in the sidecar), so Envoy's trusted-proxy filter chains and the filter's policy come from one
list; setting TRUSTED_PROXY_RANGES as well is refused. The same conversion as
autohttps_tests::envoy::trusted_proxy_ranges: an empty list becomes 0.0.0.0/32, which no TCP
peer has.

usage: render.py TEMPLATE [VARS.env ...] [autohttps.toml] [NAME=VALUE ...] > rendered.yaml
"""
import ipaddress
import os
import re
import sys
import tomllib


def trusted_proxy_ranges(sidecar_config):
    with open(sidecar_config, "rb") as f:
        config = tomllib.load(f)
    proxies = config.get("edge", {}).get("trusted_proxies", [])
    override = os.environ.get("AUTOHTTPS_EDGE_TRUSTED_PROXIES")
    if override is not None:
        # As the sidecar reads a list variable: a TOML array, or comma-separated.
        if override.lstrip().startswith("["):
            try:
                proxies = tomllib.loads(f"value = {override}")["value"]
            except tomllib.TOMLDecodeError:
                sys.exit(f"AUTOHTTPS_EDGE_TRUSTED_PROXIES={override!r} starts with '[' but is "
                         "not a TOML array (expected e.g. [\"10.0.0.0/8\"] or 10.0.0.0/8, ::1)")
        else:
            proxies = [p.strip() for p in override.split(",") if p.strip()]
    ranges = []
    for raw in proxies:
        try:
            if not isinstance(raw, str):
                raise ValueError(raw)
            interface = ipaddress.ip_interface(raw.strip())
        except ValueError:
            sys.exit(f"{sidecar_config}: edge.trusted_proxies: {raw!r} is not an IP address or "
                     "CIDR (expected e.g. 10.0.0.0/8 or ::1/128)")
        ranges.append(f'{{address_prefix: "{interface.ip}", '
                      f'prefix_len: {interface.network.prefixlen}}}')
    if not ranges:
        ranges.append('{address_prefix: "0.0.0.0", prefix_len: 32}')
    return "[" + ", ".join(ranges) + "]"


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    template = open(argv[1], encoding="utf-8").read()
    values = {}
    from_sidecar = None
    for arg in argv[2:]:
        if arg.endswith(".toml"):
            from_sidecar = arg
            continue
        if "=" in arg and not arg.endswith(".env"):
            name, value = arg.split("=", 1)
            values[name] = value
            continue
        for line in open(arg, encoding="utf-8"):
            line = line.strip()
            if line and not line.startswith("#"):
                name, value = line.split("=", 1)
                values[name] = value
    if from_sidecar is not None:
        if "TRUSTED_PROXY_RANGES" in values:
            sys.exit(f"TRUSTED_PROXY_RANGES is set and {from_sidecar} is given: keep the trusted "
                     "proxies in one place, the sidecar's edge.trusted_proxies")
        values["TRUSTED_PROXY_RANGES"] = trusted_proxy_ranges(from_sidecar)
    missing = sorted({m for m in re.findall(r"\$\{([A-Z0-9_]+)\}", template) if m not in values})
    if missing:
        sys.exit(f"{argv[1]}: no value for {', '.join(missing)}; pass NAME=VALUE or a .env file")
    sys.stdout.write(re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: values[m.group(1)], template))


if __name__ == "__main__":
    main(sys.argv)
