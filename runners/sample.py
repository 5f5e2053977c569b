"""`python runners/sample.py RUN_DIR --seeds 0-63 --out grid.png`: the same as `edm-opt sample`."""

from edm_opt.cli import sample

if __name__ == "__main__":
    sample(prog_name="runners/sample.py")
