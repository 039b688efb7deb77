import os
import sys

# tests are a package importable from the repository root, so that worker functions
# defined in test modules unpickle inside the forkserver's ranks
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")
