"""Run train.py with its arguments, and SIGKILL the process the moment its first epoch checkpoint is complete:
an interruption at a known point (no polling race), with no chance to clean up, as a power cut or an OOM kill.

    python tests/kill_after_checkpoint.py TRAIN_ARGS...
"""

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dermadetect.engine as engine  # noqa: E402

save_checkpoint = engine.save_checkpoint


def save_then_die(*args, **kwargs):
    save_checkpoint(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


engine.save_checkpoint = save_then_die  # train.py imports the name after this, so it gets the lethal one
sys.argv = [str(REPO / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
