#!/usr/bin/env bash
# Rebuild the shipped toy router (app/toy/checkpoints/router: the MLP, PCA + scaler, arm table; the encoder comes
# from its package): three searches on 400 toy test problems (greedy, best-of-N N=16, beam search N=4) into
# runs/toy/router-records/ (a killed run resumes), then `ponder route train` and `ponder route eval`.
# About 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
REC=${REC:-runs/toy/router-records}
python -m jobs.search --config toy/greedy output_dir=$REC/greedy data.limit=400 progress=false
python -m jobs.search --config toy/best_of_n output_dir=$REC/best_of_n data.limit=400 progress=false
python -m jobs.search --config toy/beam_search output_dir=$REC/beam_search_n4 search.n=4 data.limit=400 progress=false
python -m jobs.route train --config toy/router router_dir=app/toy/checkpoints/router filter.report_both=false
python -m jobs.route eval --config toy/router router_dir=app/toy/checkpoints/router eval_dir=runs/toy/router-eval
