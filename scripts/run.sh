#!/usr/bin/env bash
# README command 1: set everything up, then run the main job (`rtl-fastai run`), passing options on.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec rtl-fastai run "$@"
