"""`torchrun --nproc_per_node=N runners/evaluate.py RUN_DIR ...`: the same as `edm-opt evaluate`."""

from edm_opt.cli import evaluate

if __name__ == "__main__":
    evaluate(prog_name="runners/evaluate.py")
