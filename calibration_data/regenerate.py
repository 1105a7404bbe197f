"""Regenerate calibration_data/digits from scikit-learn's bundled digits (same as
`python -m edgemml.data.calibration`). Run from anywhere: python calibration_data/regenerate.py"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgemml.data.calibration import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["--out", str(Path(__file__).resolve().parent)]))
