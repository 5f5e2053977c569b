"""`python runners/diagnose.py MODEL --data SRC`: the same as `edm-opt diagnose`."""

from edm_opt.cli import diagnose

if __name__ == "__main__":
    diagnose(prog_name="runners/diagnose.py")
