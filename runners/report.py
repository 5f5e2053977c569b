"""`python runners/report.py --experiment NAME --out report.pdf`: the same as `edm-opt report`."""

from edm_opt.cli import report

if __name__ == "__main__":
    report(prog_name="runners/report.py")
