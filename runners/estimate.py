"""`python runners/estimate.py --data SRC ...`: the same as `edm-opt estimate`."""

from edm_opt.cli import estimate

if __name__ == "__main__":
    estimate(prog_name="runners/estimate.py")
