"""The fixed benchmark suite: runs ``wsi-embed bench`` on each case in a fresh process and writes
JSON plus a markdown table, with the machine's details, to ``benchmarks/results/``.

    python benchmarks/run_suite.py                     # CPU suite (tiny encoder for the big cases)
    python benchmarks/run_suite.py --gpu               # GPU suite (bf16, the Lunit trunks)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "sample_data" / "CMU-1-Small-Region.svs"


def make_data(data: Path, quick: bool) -> dict[str, Path]:
    from sample_data.synthetic import make_biopsies, make_slide

    data.mkdir(parents=True, exist_ok=True)
    big = 12000 if quick else 40000
    cases = {
        "slide-12k-0.5": (12000, 0.5),
        "slide-40k-0.5": (big, 0.5),
        "slide-40k-0.25": (big, 0.25),
    }
    paths = {}
    for name, (size, mpp) in cases.items():
        path = data / f"{name}.tif"
        if not path.exists():
            t0 = time.perf_counter()
            make_slide(path, width=size, height=size, mpp=mpp)
            print(f"made {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        paths[name] = path
    biopsies = data / "biopsies"
    n = 40 if quick else 200
    if len(list(biopsies.glob("*.tif"))) != n:
        make_biopsies(biopsies, n)
    paths["biopsies"] = biopsies
    cohort = data / "cohort-12k"  # steady state: the next slide is prepared while this one computes
    for i in range(6):
        path = cohort / f"slide_{i}.tif"
        if not path.exists():
            make_slide(path, width=12000, height=12000, mpp=0.5, seed=i + 1)
    paths["cohort"] = cohort
    return paths


def cpu_cases(p: dict[str, Path]) -> list[dict]:
    tiny = {"model": "timm:test_vit"}
    return [
        {"name": "sample slide, lunit-bt-rn50", "target": SAMPLE, "model": "lunit-bt-rn50", "max_patches": 0},
        {"name": "12k x 12k @0.5, lunit-bt-rn50 (every tissue patch)", "target": p["slide-12k-0.5"],
         "model": "lunit-bt-rn50", "max_patches": 0},
        {"name": "12k x 12k @0.5, tiny encoder", "target": p["slide-12k-0.5"], **tiny, "max_patches": 2048},
        {"name": "40k x 40k @0.5, tiny encoder", "target": p["slide-40k-0.5"], **tiny, "max_patches": 2048},
        {"name": "40k x 40k @0.25 (40x, 448->224), tiny encoder", "target": p["slide-40k-0.25"], **tiny,
         "max_patches": 2048},
        {"name": "200 biopsies, tiny encoder", "target": p["biopsies"], **tiny, "max_patches": 1024},
    ]


def gpu_cases(p: dict[str, Path]) -> list[dict]:
    n = 8192
    return [
        {"name": "20x slide, lunit-bt-rn50 bf16", "target": p["slide-40k-0.5"], "model": "lunit-bt-rn50",
         "max_patches": n, "batch_size": 256},
        {"name": "20x slide, lunit-dino-vits16 bf16", "target": p["slide-40k-0.5"], "model": "lunit-dino-vits16",
         "max_patches": n, "batch_size": 256},
        {"name": "20x slide, lunit-dino-vits8 bf16", "target": p["slide-40k-0.5"], "model": "lunit-dino-vits8",
         "max_patches": n // 4, "batch_size": 128},
        {"name": "40x slide (448->224), lunit-bt-rn50 bf16", "target": p["slide-40k-0.25"],
         "model": "lunit-bt-rn50", "max_patches": n, "batch_size": 256},
        {"name": "200 biopsies, lunit-bt-rn50 bf16", "target": p["biopsies"], "model": "lunit-bt-rn50",
         "max_patches": 2048, "batch_size": 256},
        {"name": "cohort of 6 12k slides, lunit-bt-rn50 bf16", "target": p["cohort"], "model": "lunit-bt-rn50",
         "max_patches": 8192, "batch_size": 256},
    ]


def run_case(case: dict, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "wsi_embed.cli", "bench", str(case["target"]), "--model", case["model"],
           "--max-patches", str(case["max_patches"]), "--json", *extra]
    if "batch_size" in case:
        cmd += ["--batch-size", str(case["batch_size"])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
    if proc.returncode != 0:
        return {"name": case["name"], "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["name"] = case["name"]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


COLUMNS = ["name", "patches", "loader_patches_per_s", "model_patches_per_s", "end_to_end_patches_per_s",
           "end_to_end_over_model", "loader_wait_fraction", "naive_loader_patches_per_s", "loader_over_naive",
           "per_slide_overhead_s", "peak_rss_mb", "peak_gpu_mem_mb"]


def markdown(results: list[dict], machine: dict, title: str) -> str:
    lines = [f"# {title}", "", f"Machine: `{json.dumps(machine)}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(str(r.get(c, r.get("error", ""))) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="GPU suite (device cuda, bf16)")
    ap.add_argument("--quick", action="store_true", help="12k slides and 40 biopsies (smoke run)")
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default=None, help="results file name (default: cpu-/gpu- and the date)")
    ap.add_argument("--only", default=None, help="run cases whose name contains this")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default=None, help="override the suite's device (dry runs)")
    ap.add_argument("--precision", default=None, help="override the suite's precision")
    args = ap.parse_args()
    paths = make_data(args.data, args.quick)
    cases = gpu_cases(paths) if args.gpu else cpu_cases(paths)
    if args.only:
        cases = [c for c in cases if args.only in c["name"]]
    device = args.device or ("cuda" if args.gpu else "cpu")
    precision = args.precision or ("bf16" if args.gpu else "fp32")
    extra = ["--device", device, "--precision", precision]
    if args.workers is not None:
        extra += ["--workers", str(args.workers)]
    results = []
    for case in cases:
        r = run_case(case, extra)
        print(json.dumps(r), flush=True)
        results.append(r)
    machine = next((r["machine"] for r in results if "machine" in r), {})
    tag = args.tag or f"{'gpu' if args.gpu else 'cpu'}-{dt.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    title = f"wsi-embed benchmark: {tag}" + (" (quick)" if args.quick else "")
    (args.out / f"{tag}.md").write_text(markdown(results, machine, title))
    print(markdown(results, machine, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
