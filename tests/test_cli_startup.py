"""The first screen: ``--help``, ``info`` and ``models`` stay quick because they never import torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wsi_embed.encoders import fetch, list_configs, models_table

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, tmp_path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_CACHE": str(tmp_path / "hf"),
                               "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_info_models_do_not_import_torch(sample_slide, tmp_path):
    out = run_python(f"""
        import json, sys
        from typer.testing import CliRunner
        from wsi_embed.cli import app
        codes = {{}}
        for args in (["--help"], ["models", "--json"], ["models"], ["info", {str(sample_slide)!r}, "--json"]):
            codes[" ".join(args[:1])] = CliRunner().invoke(app, args).exit_code
        heavy = sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules)
        print(json.dumps({{"codes": codes, "heavy": heavy}}))
    """, tmp_path)
    assert out["heavy"] == [], f"the first screen imported {out['heavy']}"
    assert set(out["codes"].values()) == {0}, out["codes"]


def test_public_names_are_lazy(tmp_path):
    out = run_python("""
        import json, sys
        import wsi_embed
        from wsi_embed import EmbedOptions, SlideJob, SlideResult, WsiEmbedError, open_store, EmbeddingStore
        from wsi_embed.encoders import Encoder, get_config, models_table
        before = "torch" in sys.modules
        from wsi_embed import embed_slide, embed_slides
        from wsi_embed.encoders import WeightsInfo, load_encoder
        import wsi_embed.pipeline as pipeline, wsi_embed.encoders.weights as weights
        same = (wsi_embed.embed_slide is pipeline.embed_slide and SlideJob is pipeline.SlideJob
                and WeightsInfo is weights.WeightsInfo)
        try:
            wsi_embed.no_such_name
            missing = False
        except AttributeError:
            missing = True
        print(json.dumps({"before": before, "after": "torch" in sys.modules, "same": same, "missing": missing,
                          "dir": "embed_slide" in dir(wsi_embed)}))
    """, tmp_path)
    assert out == {"before": False, "after": True, "same": True, "missing": True, "dir": True}


def test_timm_source_matches_timm():
    import timm

    for cfg in list_configs():
        if cfg.family == "timm":
            pcfg = timm.models.get_pretrained_cfg(cfg.kwargs["model_name"]).to_dict()
            assert dict(cfg.timm_source) == {k: pcfg.get(k) or None for k in ("hf_hub_id", "hf_hub_filename", "url")}


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(fetch.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def cached(name: str) -> bool | None:
    return {r["name"]: r["cached"] for r in models_table()}[name]


def test_models_table_sees_timm_weights_in_hf_cache(empty_caches):
    assert cached("imagenet-vits16") is False
    repo = dict(next(c for c in list_configs() if c.name == "imagenet-vits16").timm_source)["hf_hub_id"]
    snap = empty_caches / "hf" / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    (snap / "model.safetensors").write_bytes(b"x")
    assert cached("imagenet-vits16") is True


def test_models_table_sees_timm_weights_in_torch_hub_cache(empty_caches):
    url = dict(next(c for c in list_configs() if c.name == "imagenet-vits16").timm_source)["url"]
    path = fetch.hub_checkpoint_dir() / fetch.url_basename(url)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    assert cached("imagenet-vits16") is True


def test_help_reads_at_80_columns():
    """Each docstring paragraph is one line of help text (Typer kept its hard breaks, cutting sentences),
    and at 80 columns (also what a pipe into less gets) no option name or text is cut off."""
    import click
    from typer.testing import CliRunner

    from wsi_embed.cli import app

    for command in app.registered_commands:
        assert all("\n" not in p for p in command.help.split("\n\n")), command.help
    listing = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"}).output
    assert "vendor and objective power" in " ".join(listing.split())
    for name in ("embed", "report", "export", "verify", "search", "bench"):
        out = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "80"}).output
        assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80, out
        params = typer_command(app, name).params
        for option in (o for p in params if isinstance(p, click.Option) for o in p.opts):
            assert option in out, (name, option)
        assert "<bool>" not in out  # a flag takes no value


def typer_command(app, name: str):
    import typer.main

    return typer.main.get_command(app).commands[name]
