"""Profile options: one definition shared by the API, the CLI and study files."""

from __future__ import annotations

from dataclasses import fields

import pytest
from typer.testing import CliRunner

from gradspec.cli import app
from gradspec.errors import GradspecError
from gradspec.options import Method, PaddingSide, ProfileOptions


def test_strings_become_enum_choices():
    options = ProfileOptions(method="reference", padding_side="left")
    assert options.method is Method.reference
    assert options.padding_side is PaddingSide.left
    assert options.method == "reference"  # fingerprints written as plain strings stay equal


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "slow"}, "--method slow: use one of fast, reference"),
        ({"dtype": "int8"}, "--dtype int8: use one of auto, float32"),
        ({"template": "alpaca"}, "--template alpaca: use one of plain, chat"),
        ({"limit": 0}, "--limit must be at least 1"),
    ],
)
def test_bad_values_are_refused_on_construction(change, message):
    with pytest.raises(GradspecError, match=message):
        ProfileOptions(**change)


def test_cli_profile_offers_every_documented_option_in_a_panel():
    text = CliRunner().invoke(app, ["profile", "--help"], env={"COLUMNS": "200"}).output
    documented = [f for f in fields(ProfileOptions) if "help" in f.metadata]
    assert documented, "ProfileOptions fields carry the CLI help"
    for option in documented:
        assert f"--{option.name.replace('_', '-')}" in text
        assert option.metadata["panel"] in text
    assert "--chunk-size" not in text
    assert "fast|reference" in text


def test_cli_refuses_a_choice_outside_the_enum(tmp_path):
    args = ["profile", "--model", str(tmp_path), "--data", "x", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--method", "slow"])
    assert result.exit_code == 2
    assert not (tmp_path / "o").exists()
