"""A stand-in experiment for tests/reproduce_experiment_test.py, fast because it imports no jax: it
counts its calls, then fails (``--fail``), stops there as an engine run without claims does
(``--no_claims``), or writes REPORT.md, a PNG and results.json with one claim, "value is
positive", as a real experiment does through jaxlab.eval.report."""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", required=True)
parser.add_argument("--value", type=float, default=1.0)
parser.add_argument("--read", default="", help="A results.json whose value + 1 is ours.")
parser.add_argument("--fail", action="store_true")
parser.add_argument("--no_claims", action="store_true")
args = parser.parse_args()
os.makedirs(args.workdir, exist_ok=True)
with open(os.path.join(args.workdir, "calls.txt"), "a") as f:
    f.write("call\n")
print("step 1/1", flush=True)
if args.fail:
    sys.exit("fake experiment: failing as asked")
if args.no_claims:
    sys.exit(0)
value = args.value
if args.read:
    with open(args.read) as f:
        value = json.load(f)["value"] + 1
verdict = "holds" if value > 0 else "does not hold"
claim = dict(claim="value is positive", paper="> 0", ours=f"{value:g}", verdict=verdict)
with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(dict(value=value, claims=[claim], claims_rule="holds if value > 0"), f)
with open(os.path.join(args.workdir, "REPORT.md"), "w") as f:
    f.write(f"# fake\n\nvalue {value}\n")
with open(os.path.join(args.workdir, "value.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n")
