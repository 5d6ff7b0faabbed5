"""`python -m fastssl.linprobe`: linear probe (the code is in fastssl/eval/linprobe.py)."""
from fastssl.eval.linprobe import main, run  # noqa: F401  (run: the entry a Slurm job calls)

if __name__ == "__main__":
    main()
