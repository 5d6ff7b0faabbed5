"""`python -m fastssl.flops`: training FLOPs of a recipe (the code is in fastssl/train/flops.py)."""
from fastssl.train.flops import main

if __name__ == "__main__":
    main()
