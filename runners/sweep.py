"""`python runners/sweep.py run|status FILE.yaml [...]`: the same as `edm-opt sweep`."""

from edm_opt.cli import sweep

if __name__ == "__main__":
    sweep(prog_name="runners/sweep.py")
