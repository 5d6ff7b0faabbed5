"""`python -m fastssl.finetune`: fine-tuning (the code is in fastssl/eval/finetune.py)."""
from fastssl.eval.finetune import main, run  # noqa: F401  (run: the entry a Slurm job calls)

if __name__ == "__main__":
    main()
