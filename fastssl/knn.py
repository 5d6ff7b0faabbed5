"""`python -m fastssl.knn`: weighted kNN evaluation (the code is in fastssl/eval/knn.py)."""
from fastssl.eval.knn import main, run  # noqa: F401  (run: the entry a Slurm job calls)

if __name__ == "__main__":
    main()
