"""`python slurm/submit.py ENTRY RECIPE [options] [key=value ...]`: see fastssl/run/launcher.py and slurm/README.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastssl

from fastssl.run.launcher import main  # noqa: E402

if __name__ == "__main__":
    main()
