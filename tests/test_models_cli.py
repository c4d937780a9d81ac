"""`vt models`: list, search and inspect timm models; describe_model behind it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vtbench.cli import app, main
from vtbench.models import describe_model

runner = CliRunner()


def test_vt_models_inspects_an_exact_name():
    result = runner.invoke(app, ["models", "test_vit"])
    assert result.exit_code == 0, result.output
    assert "test_vit: vit" in result.output
    assert "prefix tokens:   1 (cls 1, dist 0, registers 0)" in result.output
    assert "cls        6 x 64" in result.output and "patch      6 x 64" in result.output
    assert "transform model: 160x160, bicubic, crop_pct 0.95" in result.output
    assert "r160_in1k" in result.output


def test_vt_models_json_with_model_kwargs_matches_describe_model():
    kwargs = {"img_size": 32, "depth": 3}
    result = runner.invoke(app, ["models", "deit_tiny_distilled_patch16_224", "--model-kwargs", json.dumps(kwargs), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info == describe_model("deit_tiny_distilled_patch16_224", kwargs)
    assert info["prefix_tokens"] == {"cls": 1, "dist": 1, "registers": 0}
    assert info["dims"] == {"cls": [192] * 3, "patch": [192] * 3, "prelogits": [192]}
    assert info["data_config"]["input_size"] == [3, 32, 32]


def test_describe_model_cnn_and_registers():
    cnn = describe_model("test_resnet")
    assert cnn["arch"] == "cnn" and cnn["num_prefix_tokens"] == 0 and set(cnn["dims"]) == {"stage", "prelogits"}
    reg = describe_model("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 2})
    assert reg["prefix_tokens"] == {"cls": 1, "dist": 0, "registers": 4} and reg["num_prefix_tokens"] == 5


def test_vt_models_lists_and_searches():
    bare = runner.invoke(app, ["models"])
    assert bare.exit_code == 0 and "deit_small_patch16_224" in bare.output and "vt models PATTERN" in bare.output
    search = runner.invoke(app, ["models", "deit_tiny*"])
    assert search.exit_code == 0
    assert {"deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"} <= set(search.output.split())
    tagged = runner.invoke(app, ["models", "deit_tiny*", "--pretrained"])
    assert "deit_tiny_patch16_224.fb_in1k" in tagged.output.split()


def test_vt_models_unknown_pattern_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "no_such_model_anywhere"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no timm model matches") and err.count("\n") == 1
