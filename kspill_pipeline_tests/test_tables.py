"""Generic etable-style rendering of tidy regression tables."""

from __future__ import annotations

import re

import pandas as pd
import polars as pl
import pytest

from kspill_pipeline.studies import tables as T


@pytest.fixture
def tidy() -> pl.DataFrame:
    rows = [
        # model, term, est, se, p, n, r2, fe, vcov, published, pub_se, pub_stars
        ("(1)", "x_a", 2.5531, 0.0040, 0.0001, 1000, 0.1234, "year+industry", "iid", 2.553, 0.004, "***"),
        ("(1)", "z", -0.0281, 0.02, 0.16, 1000, 0.1234, "year+industry", "iid", None, None, None),
        ("(2)", "x_a", 0.7331, 0.3, 0.03, 900, 0.2, "year", "iid", None, None, None),
        ("(2)", "w", 0.00006, 0.00003, 0.07, 900, 0.2, "year", "iid", None, None, None),
    ]
    return pl.DataFrame(rows, orient="row", schema=[
        "model", "term", "estimate", "std_error", "p_value", "n_obs", "pseudo_r2", "fixed_effects", "vcov",
        "published", "published_std_error", "published_stars"])


def test_stars_and_numbers():
    assert T.stars_for(0.009) == "***" and T.stars_for(0.01) == "**" and T.stars_for(0.049) == "**"
    assert T.stars_for(0.099) == "*" and T.stars_for(0.1) == "" and T.stars_for(None) == ""
    assert T.fmt_number(2.5531, 3) == "2.553"
    assert T.fmt_number(-0.0248, 4) == "-0.0248"
    assert T.fmt_number(0.00006, 4) == "0.000060"  # too small for 4 decimals: 2 significant digits
    assert T.fmt_number(float("nan")) == ""


def test_markdown_layout(tidy):
    md = T.to_markdown(tidy, terms=["x_a", "z", "w"], term_labels={"x_a": "X a"}, title="T")
    lines = md.splitlines()
    assert lines[0] == "**T**"
    assert lines[2] == "|  | (1) | (2) |"
    assert "| X a | 2.553\\*\\*\\* | 0.733\\*\\* |" in md
    assert "|  | (0.0040) | (0.3000) |" in md
    assert "| w |  | 0.000060\\* |" in md
    # FE indicator rows from the fixed_effects column: (2) has no industry FE
    assert "| year FE | Yes | Yes |" in md
    assert "| industry FE | Yes | No |" in md
    assert "| Observations | 1,000 | 900 |" in md
    assert "| Pseudo R2 | 0.1234 | 0.2000 |" in md
    assert "| S.E. type | iid | iid |" in md
    # term order as asked, each term followed by its SE row
    order = [ln.split("|")[1].strip() for ln in lines[4:10]]
    assert order == ["X a", "", "z", "", "w", ""]


def test_published_side_column(tidy):
    md = T.to_markdown(tidy, show_published=True)
    assert md.splitlines()[0] == "|  | (1) | published | (2) |"
    assert "| x_a | 2.553\\*\\*\\* | 2.553\\*\\*\\* | 0.733\\*\\* |" in md
    assert "|  | (0.0040) | (0.0040) | (0.3000) |" in md
    html = T.to_html(tidy, show_published=True)
    assert html.count('class="pub"') >= 3


def test_latex_booktabs_and_escaping(tidy):
    tex = T.to_latex(tidy, caption="Table 1 & more", label="tab:t1")
    for cmd in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lcc}", r"\label{tab:t1}"):
        assert cmd in tex
    assert r"x\_a & 2.553$^{***}$ & 0.733$^{**}$ \\" in tex
    assert r"\caption{Table 1 \& more}" in tex
    assert "year FE & Yes & Yes" in tex


def test_html_self_contained(tidy):
    html = T.to_html(tidy, title="<T>")
    assert html.startswith("<!DOCTYPE html>") and "<table" in html and "<style>" in html
    assert not re.search(r"https?://|<script|<link", html)
    assert "&lt;T&gt;" in html
    assert "<td>(0.0040)</td>" in html
    frag = T.to_html(tidy, full_page=False)
    assert not frag.startswith("<!DOCTYPE")


def test_columns_from_several_keys_and_uniqueness(tidy):
    two = pl.concat([tidy.filter(pl.col("model") == "(1)"),
                     tidy.filter(pl.col("model") == "(1)").with_columns(pl.lit("CRV1(firm)").alias("vcov"))])
    with pytest.raises(ValueError, match="not unique"):
        T.to_markdown(two)
    md = T.to_markdown(two, columns=("model", "vcov"))
    assert md.splitlines()[0] == "|  | (1) iid | (1) CRV1(firm) |"


def test_accepts_pandas_and_minimal_columns(tidy):
    md = T.to_markdown(tidy.select("model", "term", "estimate", "std_error").to_pandas())
    assert "| x_a | 2.553 | 0.733 |" in md  # no p-values: no stars
    assert "FE" not in md and "Observations" not in md
    assert isinstance(tidy.to_pandas(), pd.DataFrame)
    with pytest.raises(ValueError, match="lacks columns"):
        T.to_markdown(tidy.drop("std_error"))
    with pytest.raises(ValueError, match="fmt"):
        T.render(tidy, "rtf")
