#!/usr/bin/env bash
# Re-create web/vendor/ from the npm registry: the browser libraries the project's HTML pages need,
# so they render offline (DVC plots page: vega/vega-lite/vega-embed; GX data docs: Bootstrap,
# bootstrap-table, jQuery, Popper, the datepicker, Font Awesome; the docs site: iframe-worker). Exact versions; only the built
# files and each package's licence are kept. Run by hand when bumping a version (`make web-vendor`).
set -euo pipefail
cd "$(dirname "$0")"
PACKAGES=(vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0 jquery@3.7.1 popper.js@1.12.9 bootstrap@4.3.1
          bootstrap-table@1.19.1 bootstrap-datepicker@1.9.0 @fortawesome/fontawesome-free@6.6.0
          iframe-worker@1.0.4)
# package -> files kept (paths inside the npm tarball's package/ folder)
declare -A FILES=(
  [vega]="build/vega.min.js"
  [vega-lite]="build/vega-lite.min.js"
  [vega-embed]="build/vega-embed.min.js LICENSE"
  [jquery]="dist/jquery.min.js LICENSE.txt"
  [popper.js]="dist/umd/popper.min.js"
  [bootstrap]="dist/css/bootstrap.min.css dist/js/bootstrap.min.js LICENSE"
  [bootstrap-table]="dist/bootstrap-table.min.js dist/bootstrap-table.min.css dist/extensions/filter-control/bootstrap-table-filter-control.min.js dist/extensions/filter-control/bootstrap-table-filter-control.min.css LICENSE"
  [bootstrap-datepicker]="dist/js/bootstrap-datepicker.min.js dist/css/bootstrap-datepicker.min.css LICENSE"
  [iframe-worker]="shim/index.js LICENSE"
  [@fortawesome/fontawesome-free]="css/all.min.css webfonts/fa-brands-400.woff2 webfonts/fa-regular-400.woff2 webfonts/fa-solid-900.woff2 webfonts/fa-v4compatibility.woff2 LICENSE.txt"
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf vendor
for spec in "${PACKAGES[@]}"; do
  name=${spec%@*}
  tgz=$(cd "$work" && npm pack --silent "$spec" | tail -1)
  mkdir -p "$work/$name"
  tar xzf "$work/$tgz" -C "$work/$name"
  dest="vendor/${name#@fortawesome/}"
  for f in ${FILES[$name]}; do
    mkdir -p "$dest/$(dirname "$f")"
    cp "$work/$name/package/$f" "$dest/$f"
  done
  printf '%s\t%s\n' "$spec" "$(node -p "require('$work/$name/package/package.json').license")" >> "$work/licences.tsv"
done
{
  echo "# Vendored browser libraries (written by web/vendor.sh from the npm registry)"
  echo
  echo "| package | licence |"
  echo "|---|---|"
  while IFS=$'\t' read -r spec lic; do echo "| $spec | $lic |"; done < "$work/licences.tsv"
  echo
  echo "Packages without a LICENSE file in their tarball (vega, vega-lite, popper.js) state their licence in"
  echo "package.json; vega and vega-lite: BSD-3-Clause, Copyright (c) the University of Washington Interactive"
  echo "Data Lab; popper.js: MIT, Copyright (c) Federico Zivolo."
} > vendor/LICENSES.md
# The docs site's search on file:// (MkDocs Material's offline plugin would load this shim from unpkg).
rm -rf ../docs/assets/vendor/iframe-worker && mkdir -p ../docs/assets/vendor
cp -r vendor/iframe-worker ../docs/assets/vendor/iframe-worker
# The `dvc plots show` template with the Vega libraries inlined (.dvc/config: plots.html_template).
(cd .. && python -m rmpipe.audit.offline > web/dvc_plots.html)
