"""G1 and memory side by side: `stepstream bench` output against `bench/diffusers_bench.py` output
(each file's last JSON line), as ours / diffusers ratios per component and kernel mode.

    python3 bench/compare.py ours.txt diffusers.txt
"""
import json
import sys


def last_json(path):
    with open(path) as f:
        lines = [l for l in f if l.startswith("{")]
    if not lines:
        sys.exit(f"{path}: no JSON line")
    return json.loads(lines[-1])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ours, theirs = last_json(sys.argv[1]), last_json(sys.argv[2])
    ref = theirs["diffusers_components"]
    print(f"ours: {ours['model']} on {ours['device']} {ours['dtype']}; "
          f"diffusers: {theirs.get('device', '?')} {theirs.get('dtype', '?')}")
    print("| component | kernels | ours ms | diffusers ms | ours / diffusers |\n|---|---|---|---|---|")
    ratios = {}
    for row in ours.get("components") or []:
        name = row["component"]
        if name in ref:
            ratio = row["ms"] / ref[name]
            ratios[(name, row["kernels"])] = ratio
            print(f"| {name} | {row['kernels']} | {row['ms']:.2f} | {ref[name]:.2f} | {ratio:.2f} |")
    peak = ours.get("peak_memory") or {}
    for row in peak.get("rows", []):
        if row.get("gib") is not None and theirs.get("peak_gib") is not None:
            print(f"| peak memory, whole generation | {row['kernels']} | {row['gib']:.2f} GiB | "
                  f"{theirs['peak_gib']:.2f} GiB | {row['gib'] / theirs['peak_gib']:.2f} |")
        if row.get("unet_gib") is not None and theirs.get("unet_peak_gib") is not None:
            print(f"| peak memory, UNet forward batch 2 | {row['kernels']} | {row['unet_gib']:.2f} GiB | "
                  f"{theirs['unet_peak_gib']:.2f} GiB | {row['unet_gib'] / theirs['unet_peak_gib']:.2f} |")
    print(json.dumps({"g1": [{"component": k[0], "kernels": k[1], "ratio": round(v, 4)}
                             for k, v in ratios.items()]}))


if __name__ == "__main__":
    main()
