"""The collection's tests: tests/ is importable (playbook_runs), whichever test directory pytest starts in."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
