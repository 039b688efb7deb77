import os
import sys

# tests are a package importable from the repository root, so that worker functions
# defined in test modules unpickle inside the forkserver's ranks
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# every compile pass checks its requires / ensures contract in the tests (autocp.passes.infra)
os.environ.setdefault("AUTOCP_CHECK_PASSES", "1")
