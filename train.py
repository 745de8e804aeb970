"""Entry point: `python train.py --config configs/X.yaml` or `deepspeed --num_gpus N train.py --config ...`."""
import sys

from densegrpo_fast.tools import train_main

if __name__ == "__main__":
    sys.exit(train_main())
