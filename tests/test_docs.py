"""The manual: a README that fits a screen, a docs site that builds strictly and renders offline, and
code samples that are the ones the tests run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from browser import page_dom

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_the_readme_fits_a_screen_and_links_only_to_pages_that_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "make repro" in text and "make test" in text
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links, "the README points at the manual"
    for link in links:
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_every_docs_page_is_in_the_nav_and_a_broken_link_fails_the_build(tmp_path):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = {next(iter(item.values())) for item in config["nav"]}
    assert in_nav == {p.name for p in (ROOT / "docs").glob("*.md")}
    # strict is what makes a broken link fail CI: prove it on a copy with one
    (tmp_path / "docs").mkdir()
    for page in (ROOT / "docs").glob("*.md"):
        (tmp_path / "docs" / page.name).write_text(page.read_text())
    (tmp_path / "mkdocs.yml").write_text((ROOT / "mkdocs.yml").read_text())
    with (tmp_path / "docs" / "index.md").open("a") as fh:
        fh.write("\nSee [a page that is gone](gone.md).\n")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "gone.md" in proc.stdout + proc.stderr


def test_the_site_names_nothing_outside_itself(site):
    from rmpipe.audit.offline import external_resources

    pages = sorted(site.glob("*.html"))
    assert {p.stem for p in pages} >= {"index", "pipeline", "guarantees", "benchmarks", "service"}
    for page in pages:
        assert external_resources(page.read_text()) == [], page.name


def test_the_site_renders_offline_in_a_browser(site, tmp_path):
    dom = page_dom((site / "pipeline.html").as_uri(), tmp_path)
    assert "md-header" in dom and "md-nav" in dom  # the theme's scripts and styles loaded from the folder
    assert "Bradley-Terry" in dom or "collect" in dom
    for title in ("Guarantees", "Benchmarks", "Service", "Audit trail"):
        assert title in dom  # the navigation lists every page
