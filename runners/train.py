"""`torchrun --standalone --nproc_per_node=N runners/train.py [options]` or `python runners/train.py [options]`.

The same command as `edm-opt train`; see `--help`.
"""

from edm_opt.cli import train

if __name__ == "__main__":
    train(prog_name="runners/train.py")
