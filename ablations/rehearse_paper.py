"""Rehearse ``hess reproduce all --preset paper`` here: CPU, random weights, data written in the real formats.

Question: does the researcher's path (VGGT-1B / π³ weights, CO3Dv2 + DTU, the ``paper`` presets) run end to end?
Command:  python ablations/rehearse_paper.py --out ablations/outputs/rehearsal --threads 1
          python ablations/rehearse_paper.py --rqs rq2,rq3 --vggt vggt-1b data.num_scenes=1   # a subset
Output:   <out>/REHEARSAL.md and rehearsal.json (seconds and peak resident memory per RQ, machine, date, load),
          <out>/results/*.md (every report headed REHEARSAL: random weights, not results).

See ``hess.rehearse`` for what is written and which overrides are applied (``SHRUNK``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hess.rehearse import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
