#!/usr/bin/env bash
# Export tsae SAEs to SAELens' format and check them in SAELens (its own venv, built on first use, ~2 min).
#   bash scripts/check_saelens_export.sh                      # random SAEs of every architecture
#   bash scripts/check_saelens_export.sh runs/demo/saes       # every SAE of a train.out_dir (or single SAE folders)
#   bash scripts/check_saelens_export.sh --venv DIR --work DIR --n 512 --rtol 1e-5 [SAE_FOLDER ...]
# Exit status: 0 all match, 1 a mismatch, 2 (or other) the venv could not be built. See check_saelens_export.py.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
cd "$HERE/.."
exec "${PYTHON:-python3}" scripts/check_saelens_export.py "$@"
