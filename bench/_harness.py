# The benchmark helpers live in the package (qengine.benchmark.harness) so `qengine bench` can
# use them; the scripts here import them under this name.
from qengine.benchmark.harness import *  # noqa: F401,F403
from qengine.benchmark.harness import __all__  # noqa: F401
