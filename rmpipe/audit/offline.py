"""HTML pages that render without a network: local copies of the browser libraries they load.

Two pages the project points users at load their libraries from CDNs and render empty
offline (treeverse/dvc#5679): `dvc plots show` (Vega) and the Great Expectations data
docs (Bootstrap, bootstrap-table, jQuery, ...). The libraries are vendored from the npm
registry into web/vendor/ (web/vendor.sh, with their licences), and:

- the DVC plots page uses web/dvc_plots.html as its HTML template (`.dvc/config`
  plots.html_template): Vega, Vega-Lite and Vega-Embed inlined, no `{scripts}`
  placeholder, so DVC's CDN script tags never reach the page;
- the validate stage rewrites the data docs it writes: each CDN URL becomes a relative
  path to a copy under `<site>/static/vendor/`, a stylesheet with no local copy (the
  optional dark theme) is dropped, and the GX logo points at the site's own image.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]  # the project checkout this package runs from (editable, or PYTHONPATH)
VENDOR = PROJECT / "web" / "vendor"
TEMPLATES = Path(__file__).parent / "templates"
PLOTS_TEMPLATE = Path("web/dvc_plots.html")
VEGA_FILES = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")

# CDN URL (regex) -> file under web/vendor/ ("" = drop the tag; a leading "site:" = a file of the GX site itself)
DATA_DOCS_ASSETS: list[tuple[str, str]] = [
    (r"https://cdn\.jsdelivr\.net/npm/vega@5[^\"']*", "vega/build/vega.min.js"),
    (r"https://cdn\.jsdelivr\.net/npm/vega-lite@5[^\"']*", "vega-lite/build/vega-lite.min.js"),
    (r"https://cdn\.jsdelivr\.net/npm/vega-embed@6[^\"']*", "vega-embed/build/vega-embed.min.js"),
    (r"https://code\.jquery\.com/jquery-3\.[0-9.]+\.min\.js", "jquery/dist/jquery.min.js"),
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/popper\.js/1\.[0-9.]+/umd/popper\.min\.js", "popper.js/dist/umd/popper.min.js"),
    (r"https://stackpath\.bootstrapcdn\.com/bootstrap/4\.[0-9.]+/js/bootstrap\.min\.js", "bootstrap/dist/js/bootstrap.min.js"),
    (r"https://maxcdn\.bootstrapcdn\.com/bootstrap/4\.[0-9.]+/css/bootstrap\.min\.css", "bootstrap/dist/css/bootstrap.min.css"),
    (r"https://unpkg\.com/bootstrap-table@1\.[0-9.]+/dist/bootstrap-table\.min\.js", "bootstrap-table/dist/bootstrap-table.min.js"),
    (r"https://unpkg\.com/bootstrap-table@1\.[0-9.]+/dist/bootstrap-table\.min\.css", "bootstrap-table/dist/bootstrap-table.min.css"),
    (r"https://unpkg\.com/bootstrap-table@1\.[0-9.]+/dist/extensions/filter-control/bootstrap-table-filter-control\.min\.js",
     "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.js"),
    (r"https://unpkg\.com/bootstrap-table@1\.[0-9.]+/dist/extensions/filter-control/bootstrap-table-filter-control(?:\.min)?\.css",
     "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.css"),
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/bootstrap-datepicker/1\.[0-9.]+/js/bootstrap-datepicker\.min\.js",
     "bootstrap-datepicker/dist/js/bootstrap-datepicker.min.js"),
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/bootstrap-datepicker/1\.[0-9.]+/css/bootstrap-datepicker\.min\.css",
     "bootstrap-datepicker/dist/css/bootstrap-datepicker.min.css"),
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/font-awesome/6\.[0-9.]+/css/all\.min\.css", "fontawesome-free/css/all.min.css"),
    (r"https://great-expectations-web-assets\.s3\.[^\"']*/logo-long\.png[^\"']*", "site:static/images/logo-long.png"),
]
DROPPED = [r"<link[^>]*https://cdn\.jsdelivr\.net/npm/@forevolve/bootstrap-dark@[^\"']*[\"'][^>]*>"]
# What still loads from the network after the rewrite: a script/style/image/font URL (plain links are fine).
_EXTERNAL = re.compile(r"<(?:script|link|img)\b[^>]*(?:src|href)=[\"'](https?:)?//[^\"']+[\"'][^>]*>", re.I)


def plots_template(vendor: Path = VENDOR) -> str:
    """The HTML template for `dvc plots show`: DVC's page with the three Vega libraries inlined
    (templates/dvc_plots.html.j2)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True, autoescape=False)
    libraries = [{"name": name.split("/")[0],
                  "code": (vendor / name).read_text(encoding="utf-8").replace("</script", "<\\/script")}
                 for name in VEGA_FILES]
    return env.get_template("dvc_plots.html.j2").render(libraries=libraries)


def external_resources(html_text: str) -> list[str]:
    """Tags that would load something from the network."""
    return [m.group(0)[:200] for m in _EXTERNAL.finditer(html_text)]


def localize_data_docs(site: Path, vendor: Path = VENDOR) -> list[str]:
    """Point every page of a GX data-docs site at local copies; returns what still loads from the network."""
    site, vendor = Path(site), Path(vendor)
    if not (vendor / "LICENSES.md").exists():
        return [f"no local copies of the browser libraries ({vendor} is missing): the pages still use CDNs"]
    local = site / "static" / "vendor"
    if local.exists():
        shutil.rmtree(local)
    shutil.copytree(vendor, local, ignore=shutil.ignore_patterns("LICENSES.md"))
    shutil.copy2(vendor / "LICENSES.md", local / "LICENSES.md")
    remaining: list[str] = []
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        up = Path(*[".."] * (len(page.relative_to(site).parts) - 1)) if len(page.relative_to(site).parts) > 1 else Path(".")
        for pattern, target in DATA_DOCS_ASSETS:
            path = (up / target[5:]) if target.startswith("site:") else (up / "static" / "vendor" / target)
            text = re.sub(pattern, path.as_posix(), text)
        for pattern in DROPPED:
            text = re.sub(pattern, "", text)
        page.write_text(text, encoding="utf-8")
        remaining += [f"{page.relative_to(site)}: {tag}" for tag in external_resources(text)]
    return remaining


if __name__ == "__main__":  # python -m rmpipe.audit.offline > web/dvc_plots.html (web/vendor.sh runs this)
    import sys

    sys.stdout.write(plots_template())
