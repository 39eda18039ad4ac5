"""The offline page assets: cheap checks that run without building a pipeline."""

from __future__ import annotations

import configparser
from pathlib import Path

from rmpipe.audit import offline

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_dvc_plots_template_is_the_vendored_libraries_inlined():
    template = (ROOT / offline.PLOTS_TEMPLATE).read_text(encoding="utf-8")
    assert template == offline.plots_template(ROOT / "web/vendor")  # rebuilt by web/vendor.sh; never drifts
    assert "{plot_divs}" in template and "{scripts}" not in template  # DVC's CDN tags have nowhere to go
    assert offline.external_resources(template) == []
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc/config")
    assert (ROOT / ".dvc" / config.get("plots", "html_template")).resolve() == (ROOT / offline.PLOTS_TEMPLATE).resolve()


def test_localize_rewrites_every_cdn_asset_to_a_relative_local_copy(tmp_path):
    site = tmp_path / "site"
    (site / "validations/x").mkdir(parents=True)
    (site / "static/images").mkdir(parents=True)
    (site / "static/images/logo-long.png").write_bytes(b"png")
    page = ('<link href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css" rel="stylesheet">'
            '<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/x.css">'
            '<script src="https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js"></script>'
            '<img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=1">'
            '<a href="https://greatexpectations.io">GX</a>')
    (site / "index.html").write_text(page)
    (site / "validations/x/page.html").write_text(page)
    assert offline.localize_data_docs(site, ROOT / "web/vendor") == []
    nested = (site / "validations/x/page.html").read_text()
    assert 'src="../../static/vendor/bootstrap-table/dist/bootstrap-table.min.js"' in nested
    assert 'href="../../static/vendor/bootstrap/dist/css/bootstrap.min.css"' in nested
    assert 'src="../../static/images/logo-long.png"' in nested and "bootstrap-dark" not in nested
    assert 'href="https://greatexpectations.io"' in nested  # a plain link is not a resource
    assert (site / "static/vendor/bootstrap-table/dist/bootstrap-table.min.js").exists()
    assert 'src="static/vendor/bootstrap-table' in (site / "index.html").read_text()
    # an asset with no local copy is reported, not silently left
    (site / "index.html").write_text('<script src="https://example.invalid/x.js"></script>')
    assert offline.localize_data_docs(site, ROOT / "web/vendor") == [
        'index.html: <script src="https://example.invalid/x.js">']
