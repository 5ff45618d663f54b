#!/usr/bin/env bash
# Build the docs site offline into _site/ from the notebooks (see DEVELOPING.md, "Docs").
#   bash scripts/docs.sh            # stored outputs of the notebooks (fast)
#   bash scripts/docs.sh --execute  # execute the notebooks first, so pages show fresh outputs
#   bash scripts/docs.sh --serve [--port 8000]   # then serve _site/ on http://127.0.0.1:8000/
# Users with Quarto can still run nbdev's own `nbdev_docs` (nbs/_quarto.yml, nbs/nbdev.yml).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# The docs renderer (in settings.ini's dev_requirements too): installed here into a venv made before it was there.
_docs_reqs=('mkdocs==1.6.1' 'mkdocs-material==9.8.2')
if ! python -c 'import mkdocs, material' >/dev/null 2>&1; then
  echo "docs: installing ${_docs_reqs[*]}"
  python -m pip install -q --disable-pip-version-check "${_docs_reqs[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
fi
exec python scripts/docs_build.py "$@"
