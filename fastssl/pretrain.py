"""`python -m fastssl.pretrain`: MAE pretraining (the code is in fastssl/train/pretrain.py)."""
from fastssl.train.pretrain import main, run  # noqa: F401  (run: the entry a Slurm job calls)

if __name__ == "__main__":
    main()
