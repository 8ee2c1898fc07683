"""Loader-only patches/s of an older commit against the current tree, on the same slides, in one run.

The old commit is checked out into a temporary ``git worktree`` (removed afterwards; the main
checkout is not touched), or taken from a folder that already holds its ``wsi_embed`` package
(``--ref-tree``, for machines without the git history). Each side is measured in its own
subprocess whose ``PYTHONPATH`` starts with its tree, so each imports its own ``wsi_embed``; the
two sides alternate (old, new, then new, old, ...) so that drift on a shared machine hits both.

    python benchmarks/compare_loader.py --ref 1c1135e SLIDE [SLIDE ...] [--rounds 3] [--json OUT]
    python benchmarks/compare_loader.py --ref-tree /tmp/ref-1c1135e SLIDE ...
    python benchmarks/compare_loader.py --workers 2 --threads 2 SLIDE  # new: 2 reading threads, old: 2 workers
    # a folder for --ref-tree:  mkdir -p D && git archive 1c1135e wsi_embed | tar -x -C D

Loader-only is what ``wsi-embed bench`` reports as ``loader_patches_per_s``: read, decode and cut
the tissue cells into uint8 batches (``wsi_embed.bench._plan`` and ``_loader_only``, which both
trees have), with the same worker count on both sides. Planning (tissue detection) is not timed;
each probe warms up on a few regions first, then times ``--repeats`` passes over every region.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
TODAY_REF = "1c1135e"  # "today's loader" before issue 9 (native tiles, one decode per tile per block)


# -- the probe: runs inside one tree's interpreter ----------------------------------------------
def probe(slides: Sequence[str], max_patches: int | None, workers: int | None, device: str, repeats: int,
          settings: Sequence[str], threads: int = 0) -> dict:
    """Loader-only rate of the ``wsi_embed`` this interpreter imports, per slide. ``threads``: in-process
    reading threads instead of ``workers``, where this tree's loader has them."""
    # An editable install of the current tree (pip install -e) adds a finder that serves any
    # wsi_embed.* module the old tree lacks from the current one: drop it, so each side runs only
    # its own code (checked below).
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not (getattr(f, "__module__", "") or "").startswith("__editable__")]
    import dataclasses
    import inspect

    import torch

    import wsi_embed
    from wsi_embed import bench

    try:
        from wsi_embed.jobs import EmbedOptions
    except ImportError:  # older trees defined it in the pipeline
        from wsi_embed.pipeline import EmbedOptions
    from wsi_embed.loader import cpu_cores

    workers = min(16, cpu_cores()) if workers is None else workers
    read = bench._loader_only
    if threads and "threads" in inspect.signature(bench._loader_only).parameters:
        workers = 0
        read = functools.partial(bench._loader_only, threads=threads)
    else:
        threads = 0
    known = {f.name for f in dataclasses.fields(EmbedOptions)}
    applied, ignored = {}, []
    for item in settings:  # e.g. decode=cpu, only where this tree's EmbedOptions has the field
        key, _, value = item.partition("=")
        if key in known:
            applied[key] = _parse(value)
        else:
            ignored.append(key)
    opts = EmbedOptions(workers=workers, device=device, **applied)
    dev = torch.device(device)
    out = {"wsi_embed": str(Path(wsi_embed.__file__).resolve().parent), "workers": workers, "threads": threads,
           "device": device,
           "applied": applied, "ignored": ignored, "slides": {}}
    plan_kwargs = {}
    if "decode" in applied and "decode" in inspect.signature(bench._plan).parameters:
        from wsi_embed.decode import resolve_decode  # trees with --decode: where tiles are decoded

        plan_kwargs["decode"] = resolve_decode(opts.decode, dev)
    for slide in slides:
        tasks, read_px = bench._plan([Path(slide)], opts, max_patches, **plan_kwargs)
        read(tasks[: max(1, len(tasks) // 10)], workers, dev)  # warm-up: workers, handles, cache
        rates = []
        n = 0
        for _ in range(repeats):
            n, seconds = read(tasks, workers, dev)
            rates.append(round(n / seconds, 2) if seconds else 0.0)
        out["slides"][slide] = {"patches": n, "read_px": read_px, "regions": len(tasks), "rates": rates}
    here = out["wsi_embed"]
    out["foreign_modules"] = sorted(name for name, m in list(sys.modules.items())
                                    if name.startswith("wsi_embed") and getattr(m, "__file__", None)
                                    and not str(Path(m.__file__).resolve()).startswith(here))
    return out


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


# -- the driver: trees, subprocesses, alternation ------------------------------------------------
@contextmanager
def ref_tree(ref: str | None, tree: Path | None) -> Iterator[tuple[Path, str]]:
    """The old tree: ``tree`` as given, else a temporary git worktree of ``ref`` (removed after)."""
    if tree is not None:
        if not (Path(tree) / "wsi_embed" / "__init__.py").is_file():
            raise SystemExit(f"--ref-tree {tree}: no wsi_embed package in it")
        yield Path(tree).resolve(), f"tree {tree}"
        return
    git = shutil.which("git")
    if git is None:
        raise SystemExit("--ref needs git; give --ref-tree DIR instead")
    sha = subprocess.run([git, "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--ref {ref}: not a commit of {ROOT} ({sha.stderr.strip()}); give --ref-tree DIR instead")
    sha = sha.stdout.strip()
    path = Path(tempfile.gettempdir()) / f"wsi-embed-ref-{sha[:10]}-{uuid.uuid4().hex[:6]}"
    add = subprocess.run([git, "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), sha],
                         capture_output=True, text=True)
    if add.returncode != 0:
        raise SystemExit(f"git worktree add failed: {add.stderr.strip()}")
    try:
        yield path, f"{ref} ({sha[:10]})"
    finally:
        subprocess.run([git, "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([git, "-C", str(ROOT), "worktree", "prune"], capture_output=True)


def _run_probe(tree: Path, args: argparse.Namespace, timeout: float | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", *map(str, args.slides),
           "--repeats", str(args.repeats), "--device", args.device]
    if args.max_patches:
        cmd += ["--max-patches", str(args.max_patches)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for item in args.set or ():
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"probe in {tree} failed:\n{tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["wsi_embed"]) != (tree / "wsi_embed").resolve() or result.get("foreign_modules"):
        raise RuntimeError(f"probe in {tree} imported {result['wsi_embed']} and "
                           f"{result.get('foreign_modules') or 'nothing else'}: check PYTHONPATH")
    return result


def compare(args: argparse.Namespace, deadline: float | None = None) -> dict:
    """Alternate old and new probes for ``args.rounds`` rounds; medians and the new/old ratio."""
    samples: dict[str, list[dict]] = {"old": [], "new": []}
    with ref_tree(args.ref, args.ref_tree) as (old_tree, label):
        trees = {"old": old_tree, "new": ROOT}
        for r in range(args.rounds):
            for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                t0 = time.perf_counter()
                result = _run_probe(trees[side], args, left)
                result["wall_s"] = round(time.perf_counter() - t0, 1)
                samples[side].append(result)
                rates = {Path(s).name: v["rates"] for s, v in result["slides"].items()}
                print(f"compare round {r + 1} {side}: {json.dumps(rates)}", file=sys.stderr, flush=True)
    out = {"ref": label, "rounds": args.rounds, "device": args.device, "max_patches": args.max_patches,
           "set": list(args.set or ()), "slides": {}}
    for slide in map(str, args.slides):
        row = {}
        for side, runs in samples.items():
            rates = [x for run in runs for x in run["slides"][slide]["rates"]]
            if not rates:
                continue
            first = runs[0]["slides"][slide]
            row[side] = {"median_patches_per_s": round(statistics.median(rates), 2), "rates": rates,
                         "patches": first["patches"], "read_px": first["read_px"], "workers": runs[0]["workers"],
                         "threads": runs[0].get("threads", 0),
                         "applied": runs[0]["applied"], "ignored": runs[0]["ignored"]}
        if "old" in row and "new" in row and row["old"]["median_patches_per_s"]:
            row["new_over_old"] = round(row["new"]["median_patches_per_s"] / row["old"]["median_patches_per_s"], 3)
        out["slides"][slide] = row
    return out


def markdown(result: dict) -> str:
    lines = [f"Loader-only patches/s, current tree vs {result['ref']} (device {result['device']}, median of "
             f"{result['rounds']} alternating rounds):", "",
             "| slide | patches | read px | old: workers | new: workers, threads | old | new | new / old |",
             "|---|---|---|---|---|---|---|---|"]
    for slide, row in result["slides"].items():
        old, new = row.get("old", {}), row.get("new", {})
        ref = new or old
        lines.append(f"| {Path(slide).name} | {ref.get('patches', '')} | {ref.get('read_px', '')} | "
                     f"{old.get('workers', '')} | {new.get('workers', '')}, {new.get('threads', 0)} | "
                     f"{old.get('median_patches_per_s', '')} | "
                     f"{new.get('median_patches_per_s', '')} | {row.get('new_over_old', '')} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slides", nargs="+", type=Path)
    ap.add_argument("--ref", default=TODAY_REF, help=f"git ref of the old tree (default {TODAY_REF})")
    ap.add_argument("--ref-tree", type=Path, default=None, help="a folder holding the old wsi_embed (no git needed)")
    ap.add_argument("--rounds", type=int, default=3, help="old/new pairs, alternating order")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per probe")
    ap.add_argument("--max-patches", type=int, default=4096, help="tissue patches per slide (0: all)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers on both sides (default min(16, cores))")
    ap.add_argument("--threads", type=int, default=0,
                    help="in-process reading threads (burst reads, the CPU device's loader) instead of workers, "
                         "on trees whose loader has them; the other tree uses --workers")
    ap.add_argument("--device", default="cpu", help="where batches go (cpu, or cuda: pinned copies included)")
    ap.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="an EmbedOptions field for trees that have it (e.g. decode=cpu or decode=gpu: "
                         "where the tiles are decoded); trees without it ignore it, and the result says so")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.probe:
        print(json.dumps(probe([str(s) for s in args.slides], args.max_patches or None, args.workers, args.device,
                               args.repeats, args.set or (), args.threads)))
        return 0
    args.slides = [s.resolve() for s in args.slides]
    result = compare(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    print(markdown(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
