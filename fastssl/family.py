"""`python -m fastssl.family`: a model family in one run (the code is in fastssl/train/family.py)."""
from fastssl.train.family import main, run  # noqa: F401  (run: the entry a Slurm job calls)

if __name__ == "__main__":
    main()
