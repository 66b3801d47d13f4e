"""The Python tests' tally: check() prints one ok/FAIL line per assertion and
done() the closing "name: N passed, N failed" line that scripts/run_tests.sh
sums, then exits non-zero if any failed."""
import sys

_count = {"passed": 0, "failed": 0}


def check(name, cond, detail=""):
    if cond:
        _count["passed"] += 1
        print(f"ok   {name}")
    else:
        _count["failed"] += 1
        print(f"FAIL {name}: {detail}")


def done(test):
    print(f"{test}: {_count['passed']} passed, {_count['failed']} failed")
    sys.exit(1 if _count["failed"] else 0)
